"""LoRA adapters on the real engine: the session server serves the demo adapter as `demo-lora` (`make
serve`'s flags). Greedy output through it is the same on every protocol and the same as vLLM's offline
`LLM.generate` with the same LoRARequest, and differs from the base model's; an adapter loaded at runtime
serves, is refused once unloaded, and lets a generation that was running finish; bad adapters are 400s
that leave the engine serving. Events and batch jobs through the adapter: tests/eventing."""

from __future__ import annotations

import json
import threading
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import tritonclient.http as triton

from predictors.adapters import LOAD_PATH, UNLOAD_PATH
from predictors.demo_model import ADAPTER_RANK, write_demo_adapter
from tests.conftest import ADAPTER_NAME, MODEL_NAME, REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS

pytestmark = pytest.mark.slow

GREEDY = {"max_tokens": REFERENCE_MAX_TOKENS, "temperature": 0}


def texts(reference: list[dict]) -> list[str]:
    return [r["text"] for r in reference]


def test_the_adapter_changes_greedy_output(offline_reference, adapter_reference) -> None:
    assert all(len(r["token_ids"]) == REFERENCE_MAX_TOKENS for r in adapter_reference)
    assert all(a != b for a, b in zip(texts(adapter_reference), texts(offline_reference), strict=True))


def v2_infer(url: str, model: str) -> list[str]:
    client = triton.InferenceServerClient(url=url.removeprefix("http://"))
    assert client.is_model_ready(model)
    inp = triton.InferInput("text_input", [len(REFERENCE_PROMPTS)], "BYTES")
    inp.set_data_from_numpy(np.array(REFERENCE_PROMPTS, dtype=object))
    res = client.infer(model, [inp], parameters=GREEDY)
    return [t.decode() for t in res.as_numpy("text_output")]


def v1_predict(url: str, model: str) -> list[str]:
    r = httpx.post(f"{url}/v1/models/{model}:predict", json={"instances": REFERENCE_PROMPTS, "parameters": GREEDY},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    return [p["text_output"] for p in r.json()["predictions"]]


def generate(url: str, model: str) -> list[str]:
    out = []
    for prompt in REFERENCE_PROMPTS:
        r = httpx.post(f"{url}/v2/models/{model}/generate", json={"text_input": prompt, "parameters": GREEDY},
                       timeout=60)  # fmt: skip
        assert r.status_code == 200 and r.json()["model_name"] == model, r.text
        out.append(r.json()["text_output"])
    return out


def generate_stream(url: str, model: str) -> list[str]:
    out = []
    for prompt in REFERENCE_PROMPTS:
        body = {"text_input": prompt, "parameters": GREEDY}
        with httpx.stream("POST", f"{url}/v2/models/{model}/generate_stream", json=body, timeout=60) as r:
            assert r.status_code == 200
            events = [json.loads(x.removeprefix("data: ")) for x in r.iter_lines() if x.startswith("data: ")]
        out.append("".join(e["text_output"] for e in events))
    return out


def openai_completions(url: str, model: str) -> list[str]:
    with openai.OpenAI(base_url=url + "/openai/v1", api_key="unused", max_retries=0) as client:
        res = client.completions.create(model=model, prompt=REFERENCE_PROMPTS, max_tokens=REFERENCE_MAX_TOKENS,
                                        temperature=0)  # fmt: skip
    return [c.text for c in sorted(res.choices, key=lambda c: c.index)]


PROTOCOLS = [v2_infer, v1_predict, generate, generate_stream, openai_completions]


@pytest.mark.parametrize("protocol", PROTOCOLS, ids=[p.__name__ for p in PROTOCOLS])
def test_adapter_output_matches_offline_on_every_protocol(server, adapter_reference, protocol) -> None:
    assert protocol(server.url, ADAPTER_NAME) == texts(adapter_reference)


def test_openai_lists_the_base_model_and_its_adapter(server) -> None:
    models = httpx.get(server.url + "/openai/v1/models", timeout=10).json()["data"]
    assert [(m["id"], m.get("parent")) for m in models] == [(MODEL_NAME, None), (ADAPTER_NAME, MODEL_NAME)]


def test_unknown_names_are_404s_naming_the_served_models(server) -> None:
    r = httpx.post(f"{server.url}/v2/models/nope/generate", json={"text_input": "x"}, timeout=10)
    assert r.status_code == 404
    assert (
        r.json()["error"]
        == f"Model with name nope does not exist. Served models: {MODEL_NAME}, {ADAPTER_NAME}."
    )
    r = httpx.post(f"{server.url}/v1/models/nope:predict", json={"instances": ["x"]}, timeout=10)
    assert r.status_code == 404 and ADAPTER_NAME in r.json()["error"]
    r = httpx.post(f"{server.url}/openai/v1/completions", json={"model": "nope", "prompt": "x"}, timeout=10)
    assert r.status_code == 404


def test_runtime_load_serve_unload_then_404(server, demo_model_dir: Path, adapter_reference) -> None:
    """Loaded from a path under a new name: the same weights give the same output; a generation running
    through it when it is unloaded finishes; new requests are then 404s on every protocol."""
    r = httpx.post(server.url + LOAD_PATH, json={"lora_name": "rt-lora", "lora_path": str(demo_model_dir / "lora")},
                   timeout=60)  # fmt: skip
    assert r.status_code == 200, r.text
    try:
        assert generate(server.url, "rt-lora") == texts(adapter_reference)
        long = {"text_input": REFERENCE_PROMPTS[0], "parameters": {"max_tokens": 1000, "ignore_eos": True}}
        running: dict[str, object] = {}
        started = threading.Event()

        def run() -> None:
            with httpx.stream(
                "POST", f"{server.url}/v2/models/rt-lora/generate_stream", json=long, timeout=120
            ) as s:
                running["status"] = s.status_code
                lines = []
                for line in s.iter_lines():
                    started.set()
                    lines.append(line)
                running["lines"] = lines

        thread = threading.Thread(target=run)
        thread.start()
        assert started.wait(60)
    finally:
        r = httpx.post(server.url + UNLOAD_PATH, json={"lora_name": "rt-lora"}, timeout=60)
    assert r.status_code == 200, r.text
    gone = httpx.post(f"{server.url}/v2/models/rt-lora/generate", json={"text_input": "x"}, timeout=10)
    assert gone.status_code == 404
    thread.join(120)
    assert running["status"] == 200
    lines = running["lines"]
    assert isinstance(lines, list)
    events = [json.loads(x.removeprefix("data: ")) for x in lines if x.startswith("data: ")]
    assert events[-1]["completion_tokens"] == 1000 and "error" not in events[-1]
    r = httpx.post(
        f"{server.url}/openai/v1/completions", json={"model": "rt-lora", "prompt": "x"}, timeout=10
    )
    assert r.status_code == 404
    assert "rt-lora" not in [m["id"] for m in httpx.get(server.url + "/openai/v1/models").json()["data"]]


def test_bad_adapters_are_400s_and_the_engine_keeps_serving(
    server, tmp_path: Path, adapter_reference
) -> None:
    too_big = write_demo_adapter(tmp_path / "rank")
    config = json.loads((too_big / "adapter_config.json").read_text())
    (too_big / "adapter_config.json").write_text(json.dumps({**config, "r": 2 * ADAPTER_RANK}))
    other = write_demo_adapter(tmp_path / "other")
    from safetensors.numpy import save_file

    wrong = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((8, 4096), np.float32),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((4096, 8), np.float32)}  # fmt: skip
    save_file(wrong, str(other / "adapter_model.safetensors"))
    for name, path, words in (
        ("missing", tmp_path / "nowhere", "no directory at"),
        ("rank", too_big, "above --max-lora-rank 8"),
        ("other", other, "does not fit the base model"),
    ):
        r = httpx.post(server.url + LOAD_PATH, json={"lora_name": name, "lora_path": str(path)}, timeout=60)
        assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
    assert generate(server.url, ADAPTER_NAME) == texts(adapter_reference)

"""LoRA adapters in-process: every protocol addresses an adapter by name, unknown names are 404s naming the
served models, runtime load/unload (local path, fsspec URI, the demo adapter) with a 400 for a bad
adapter, behind authentication, and per-adapter metrics. The fake engine lower-cases through an adapter
(upper-cases for the base model); names live in vLLM's real `OpenAIServingModels`. Real-engine output
through the demo adapter is tested on the session server (tests/predictors/test_adapters_engine.py)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from predictors import adapters, metrics
from predictors.demo_model import ADAPTER_RANK, write_demo_adapter, write_demo_model
from predictors.server import parse_args
from tests import inprocess
from tests.predictors.harness import MODEL_NAME, scrape, sse, total, v2_body

LOAD, UNLOAD = adapters.LOAD_PATH, adapters.UNLOAD_PATH


@pytest.fixture(scope="module")
def demo_adapter(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_demo_adapter(tmp_path_factory.mktemp("adapter") / "ad1")


def static(name: str, path: Path) -> Any:
    from vllm.entrypoints.openai.models.protocol import LoRAModulePath

    return LoRAModulePath(name=name, path=str(path))


def test_every_protocol_serves_an_adapter_by_name(demo_adapter: Path) -> None:
    async def main() -> None:
        async with (
            inprocess.server(lora=True, lora_modules=[static("ad1", demo_adapter)]) as s,
            s.client() as c,
        ):
            r = await c.post("/v2/models/ad1/infer", json=v2_body(["Hi There"]))
            assert r.status_code == 200, r.text
            assert r.json()["model_name"] == "ad1" and r.json()["outputs"][0]["data"] == ["hi there"]
            r = await c.post("/v1/models/ad1:predict", json={"instances": ["Hi There"]})
            assert r.status_code == 200 and r.json()["predictions"][0]["text_output"] == "hi there"
            r = await c.post("/v2/models/ad1/generate", json={"text_input": "Hi There"})
            assert r.status_code == 200 and r.json()["text_output"] == "hi there"
            assert r.json()["model_name"] == "ad1"
            r = await c.post("/v2/models/ad1/generate_stream", json={"text_input": "Hi"})
            events = sse(r.text)
            assert "".join(e["text_output"] for e in events) == "hi" and events[0]["model_name"] == "ad1"
            # The base model is unchanged beside it.
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "Hi There"})
            assert r.json()["text_output"] == "HI THERE"
            assert s.engine.fake.loras == ["ad1", "ad1", "ad1", "ad1", None]
            # Metadata, readiness and KServe's listings know the adapter.
            assert (await c.get("/v2/models/ad1/ready")).status_code == 200
            assert (await c.get("/v2/models/ad1")).json()["name"] == "ad1"
            assert (await c.get("/v1/models/ad1")).status_code == 200
            assert sorted((await c.get("/v2/models")).json()["models"]) == ["ad1", MODEL_NAME]

    asyncio.run(main())


def test_an_unknown_name_is_a_404_naming_the_served_models(demo_adapter: Path) -> None:
    async def main() -> None:
        async with (
            inprocess.server(lora=True, lora_modules=[static("ad1", demo_adapter)]) as s,
            s.client() as c,
        ):
            want = {"error": "Model with name nope does not exist. Served models: demo, ad1."}
            for method, path, body in (
                ("POST", "/v2/models/nope/infer", v2_body(["a"])),
                ("POST", "/v2/models/nope/generate", {"text_input": "a"}),
                ("POST", "/v2/models/nope/generate_stream", {"text_input": "a"}),
                ("POST", "/v1/models/nope:predict", {"instances": ["a"]}),
                ("GET", "/v2/models/nope/ready", None),
                ("GET", "/v2/models/nope", None),
            ):
                r = await c.request(method, path, json=body)
                assert (r.status_code, r.json()) == (404, want), path
            assert s.engine.fake.requests == []

    asyncio.run(main())


def _load(name: str, path: str | Path, **extra: Any) -> dict[str, Any]:
    return {"lora_name": name, "lora_path": str(path), **extra}


def test_runtime_load_serve_unload_then_404(demo_adapter: Path, tmp_path: Path) -> None:
    async def main() -> None:
        async with inprocess.server(["--cache_dir", str(tmp_path)], lora=True) as s, s.client() as c:
            r = await c.post("/v2/models/ad2/generate", json={"text_input": "Hi"})
            assert r.status_code == 404
            r = await c.post(LOAD, json=_load("ad2", demo_adapter))
            assert r.status_code == 200, r.text
            assert "ad2" in r.text
            r = await c.post("/v2/models/ad2/generate", json={"text_input": "Hi"})
            assert r.status_code == 200 and r.json()["text_output"] == "hi"
            assert "ad2" in s.dataplane.model_names()
            r = await c.post(UNLOAD, json={"lora_name": "ad2"})
            assert r.status_code == 200, r.text
            r = await c.post("/v2/models/ad2/generate", json={"text_input": "Hi"})
            assert r.status_code == 404 and "Served models: demo." in r.json()["error"]
            r = await c.post(UNLOAD, json={"lora_name": "ad2"})
            assert r.status_code == 404 and r.json()["error"]["type"] == "NotFoundError"

    asyncio.run(main())


def test_an_adapter_from_an_fsspec_uri_is_downloaded_to_the_cache_dir(
    demo_adapter: Path, tmp_path: Path
) -> None:
    import fsspec

    fs = fsspec.filesystem("memory")
    for f in demo_adapter.iterdir():
        fs.pipe(f"/adapters/ad3/{f.name}", f.read_bytes())

    async def main() -> None:
        async with inprocess.server(["--cache_dir", str(tmp_path)], lora=True) as s, s.client() as c:
            r = await c.post(LOAD, json=_load("ad3", "memory://adapters/ad3"))
            assert r.status_code == 200, r.text
            (local,) = s.engine.fake.added
            assert Path(local).parent == tmp_path / "adapters"
            assert (Path(local) / "adapter_model.safetensors").read_bytes() == (
                demo_adapter / "adapter_model.safetensors"
            ).read_bytes()
            r = await c.post("/v1/models/ad3:predict", json={"instances": ["OK"]})
            assert r.json()["predictions"][0]["text_output"] == "ok"
            r = await c.post(LOAD, json=_load("ad4", "memory://adapters/none"))
            assert (
                r.status_code == 400
                and "no directory at memory://adapters/none" in r.json()["error"]["message"]
            )
            # The demo adapter by its source name, as `--lora-modules demo-lora=demo` names it.
            r = await c.post(LOAD, json=_load("demo-lora", "demo"))
            assert r.status_code == 200, r.text
            assert Path(s.engine.fake.added[-1]) == tmp_path / "demo-model-v1" / "lora"

    asyncio.run(main())


def _bad_adapters(root: Path, demo_adapter: Path) -> dict[str, tuple[Path, str]]:
    """Adapters the server must refuse with a 400, and the words the refusal must say."""
    from safetensors.numpy import save_file

    no_config = root / "no-config"
    no_config.mkdir()
    (no_config / "adapter_model.safetensors").write_bytes(
        (demo_adapter / "adapter_model.safetensors").read_bytes()
    )
    no_weights = root / "no-weights"
    no_weights.mkdir()
    (no_weights / "adapter_config.json").write_text((demo_adapter / "adapter_config.json").read_text())
    too_big = write_demo_adapter(root / "rank-16")
    config = json.loads((too_big / "adapter_config.json").read_text())
    (too_big / "adapter_config.json").write_text(json.dumps({**config, "r": 16}))
    other_base = write_demo_adapter(root / "other-base")
    wrong = {"base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": np.zeros((8, 96), np.float32),
             "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": np.zeros((128, 8), np.float32)}  # fmt: skip
    save_file(wrong, str(other_base / "adapter_model.safetensors"))
    not_json = write_demo_adapter(root / "not-json")
    (not_json / "adapter_config.json").write_text("{")
    return {
        "missing": (root / "nowhere", "no directory at"),
        "no-config": (no_config, "adapter_config.json is missing"),
        "no-weights": (no_weights, "no adapter_model.safetensors or adapter_model.bin"),
        "rank": (too_big, f"has rank 16, above --max-lora-rank {ADAPTER_RANK}"),
        "other-base": (other_base, "does not fit the base model"),
        "not-json": (not_json, "is not valid JSON"),
    }


def test_a_bad_adapter_is_a_400_that_disturbs_nothing(demo_adapter: Path, tmp_path: Path) -> None:
    base = write_demo_model(tmp_path / "base")  # the shapes the adapter must fit

    async def main() -> None:
        mods = [static("ad1", demo_adapter)]
        async with inprocess.server(lora=True, lora_modules=mods) as s, s.client() as c:
            s.engine.args.model = str(base)
            for name, (path, words) in _bad_adapters(tmp_path, demo_adapter).items():
                r = await c.post(LOAD, json=_load(name, path))
                assert r.status_code == 400, (name, r.text)
                assert words in r.json()["error"]["message"], (name, r.json())
            for body, words in (
                (_load(MODEL_NAME, demo_adapter), "is the base model's name"),
                (_load("ad1", demo_adapter), "already loaded"),
                ({"lora_name": "x"}, "lora_path is required"),
                ({"lora_name": "x", "lora_path": "y", "extra": 1}, "unknown field(s): extra"),
                (_load("x", demo_adapter, load_inplace="yes"), "load_inplace must be a boolean"),
            ):
                r = await c.post(LOAD, json=body)
                assert r.status_code == 400 and words in r.json()["error"]["message"], r.text
            r = await c.post(UNLOAD, json={"lora_name": MODEL_NAME})
            assert r.status_code == 400 and "cannot be unloaded" in r.text
            r = await c.post(LOAD, content=b"{")
            assert r.status_code == 400 and "not valid JSON" in r.text
            assert s.engine.fake.added == [str(demo_adapter)]  # only the good one reached the engine
            assert s.dataplane.model_names() == [MODEL_NAME, "ad1"]
            r = await c.post("/v2/models/ad1/generate", json={"text_input": "Still"})
            assert r.json()["text_output"] == "still"
            # In place: the same name, new files.
            r = await c.post(LOAD, json=_load("ad1", demo_adapter, load_inplace=True))
            assert r.status_code == 200, r.text

    asyncio.run(main())


def test_load_and_unload_need_lora_on_and_credentials(demo_adapter: Path, tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("k1\n")

    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(LOAD, json=_load("ad1", demo_adapter))
            assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]
        async with inprocess.server(["--api_keys_file", str(keys)], lora=True) as s, s.client() as c:
            r = await c.post(LOAD, json=_load("ad1", demo_adapter))
            assert r.status_code == 401
            r = await c.post(UNLOAD, json={"lora_name": "ad1"})
            assert r.status_code == 401
            r = await c.post(LOAD, json=_load("ad1", demo_adapter), headers={"X-API-Key": "k1"})
            assert r.status_code == 200, r.text
        async with inprocess.server(lora=True, start=False) as s, s.client() as c:
            r = await c.post(LOAD, json=_load("ad1", demo_adapter))
            assert r.status_code == 503

    asyncio.run(main())


def test_requests_in_flight_finish_after_their_adapter_is_unloaded(demo_adapter: Path) -> None:
    async def main() -> None:
        mods = [static("ad1", demo_adapter)]
        async with inprocess.server(lora=True, lora_modules=mods, delay=0.02) as s, s.client() as c:
            running = asyncio.ensure_future(
                c.post(
                    "/v2/models/ad1/generate",
                    json={"text_input": "Finish Me", "parameters": {"max_tokens": 9}},
                )
            )
            while not s.engine.fake.requests:
                await asyncio.sleep(0.005)
            assert (await c.post(UNLOAD, json={"lora_name": "ad1"})).status_code == 200
            assert (await c.post("/v2/models/ad1/generate", json={"text_input": "x"})).status_code == 404
            r = await running
            assert r.status_code == 200 and r.json()["text_output"] == "finish me"

    asyncio.run(main())


def test_metrics_carry_the_adapter_name_and_only_served_names(demo_adapter: Path) -> None:
    async def main() -> None:
        mods = [static("ad1", demo_adapter)]
        async with inprocess.server(lora=True, lora_modules=mods) as s, s.client() as c:
            before = await scrape(c)
            # Created at startup for the configured adapter, at zero.
            assert "evllm_completion_tokens_total" + '{model="ad1",protocol="v2"}' in before
            await c.post("/v2/models/ad1/infer", json=v2_body(["abc"]))
            await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["abcd"]))
            await c.post("/v2/models/nope/infer", json=v2_body(["abc"]))
            await c.post(LOAD, json=_load("ad2", demo_adapter))
            after = await scrape(c)

            def grew(name: str, **labels: str) -> float:
                return total(after, name, **labels) - total(before, name, **labels)

            assert grew("evllm_completion_tokens_total", model="ad1", protocol="v2") == 3
            assert grew("evllm_completion_tokens_total", model=MODEL_NAME, protocol="v2") == 4
            assert grew("evllm_requests_total", model="ad1", protocol="v2", code="200") == 1
            assert grew("evllm_requests_total", model=MODEL_NAME, protocol="v2", code="404") == 1
            assert not [k for k in after if 'model="nope"' in k]
            assert "evllm_completion_tokens_total" + '{model="ad2",protocol="v2"}' in after  # loaded: at zero

    asyncio.run(main())
    metrics.init(MODEL_NAME, 1)


def test_lora_modules_are_checked_at_startup(tmp_path: Path) -> None:
    argv = ["--model_name", "m", "--model_dir", "demo", "--cache_dir", str(tmp_path)]
    settings = parse_args([*argv, "--enable-lora", "--max-lora-rank", "8", "--lora-modules", "ad=demo"])
    (module,) = settings.engine.lora_modules
    assert module.name == "ad" and module.path == str(tmp_path / "demo-model-v1" / "lora")


@pytest.mark.parametrize(
    "flags, words",
    [
        (["--lora-modules", "ad=demo"], "--lora-modules needs --enable-lora"),
        (["--enable-lora", "--max-lora-rank", "1", "--lora-modules", "ad=demo"], "above --max-lora-rank 1"),
        (["--enable-lora", "--lora-modules", "ad=/nowhere"], "no directory at /nowhere"),
    ],
)
def test_a_bad_lora_module_is_a_one_line_usage_error(
    tmp_path: Path, capsys, flags: list[str], words: str
) -> None:
    argv = ["--model_name", "m", "--model_dir", "demo", "--cache_dir", str(tmp_path)]
    with pytest.raises(SystemExit) as exc:
        parse_args([*argv, *flags])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err, err


def test_the_cpu_lora_fix_gives_base_rows_no_adapter_contribution() -> None:
    """vLLM's CPU kernel indexes the adapter weights with -1 (the base model) and gets the last slot;
    the fix (predictors.cpu_lora, loaded into the engine by --worker-extension-cls) builds every LoRA
    layer with one spare slot, never loaded, so the last slot is all zeros. (On the real engine: a batch
    job mixing base and adapter lines gives each line its model's offline output, tests/eventing.)"""
    import torch
    import vllm.lora.model_manager as manager
    import vllm.lora.ops.torch_ops.lora_ops as ops
    from vllm.model_executor.layers.fused_moe import MoERunner

    from predictors import cpu_lora

    inputs, indices = torch.ones(2, 3), torch.tensor([-1, 0])
    adapter = torch.ones(1, 2, 3)  # one adapter slot: rank 2, input 3
    raw, fixed = torch.zeros(2, 2), torch.zeros(2, 2)
    ops.bgmv_shrink(inputs, adapter, raw, indices)
    assert raw.tolist() == [[3.0, 3.0], [3.0, 3.0]]  # the bug: the base row got the adapter
    with_spare = torch.cat([adapter, torch.zeros(1, 2, 3)])  # what the fixed layers allocate
    ops.bgmv_shrink(inputs, with_spare, fixed, indices)
    assert fixed.tolist() == [[0.0, 0.0], [3.0, 3.0]]

    cpu_lora.apply()
    cpu_lora.apply()  # idempotent
    assert all(getattr(getattr(manager, name), "evllm_fixed", False) for name in cpu_lora.FACTORIES)
    seen = []
    build = cpu_lora.with_spare_slot(lambda layer, max_loras, *rest: seen.append(max_loras), 1)
    build(torch.nn.Linear(3, 2), 1, "config")
    build(MoERunner.__new__(MoERunner), 1, "config")  # fused MoE: its weights are split by the slot count
    logits = cpu_lora.with_spare_slot(lambda proc, head, max_loras, *rest: seen.append(max_loras), 2)
    logits(torch.nn.Identity(), torch.nn.Linear(3, 2), 1, "config")
    assert seen == [2, 1, 2]


def test_lora_on_cpu_loads_the_fix_into_the_engine(tmp_path: Path) -> None:
    from predictors.cpu_lora import QUALNAME

    argv = ["--model_name", "m", "--model_dir", "demo", "--cache_dir", str(tmp_path)]
    assert parse_args([*argv, "--enable-lora"]).engine.worker_extension_cls == QUALNAME
    assert not parse_args(argv).engine.worker_extension_cls  # LoRA off: nothing changes

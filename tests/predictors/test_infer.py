"""OIP V2 infer and KServe V1 predict against the real server, with tritonclient.http and httpx."""

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests.conftest import MODEL_NAME, REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS

pytestmark = pytest.mark.slow
GREEDY = {"max_tokens": REFERENCE_MAX_TOKENS, "temperature": 0}


def _client(server):
    return triton.InferenceServerClient(url=server.url.removeprefix("http://"))


@pytest.mark.parametrize("binary", [False, True])
def test_v2_infer_n_prompts_with_tritonclient(server, offline_reference, binary):
    client = _client(server)
    inp = triton.InferInput("text_input", [len(REFERENCE_PROMPTS)], "BYTES")
    inp.set_data_from_numpy(np.array(REFERENCE_PROMPTS, dtype=object), binary_data=binary)
    outputs = [
        triton.InferRequestedOutput(name, binary_data=binary)
        for name in ("text_output", "finish_reason", "prompt_tokens", "completion_tokens")
    ]
    res = client.infer(MODEL_NAME, [inp], outputs=outputs, parameters=GREEDY)
    texts = [t.decode() if isinstance(t, bytes) else t for t in res.as_numpy("text_output")]
    assert texts == [r["text"] for r in offline_reference]
    assert list(res.as_numpy("completion_tokens")) == [len(r["token_ids"]) for r in offline_reference]
    assert all(int(n) > 0 for n in res.as_numpy("prompt_tokens"))
    reasons = [r.decode() if isinstance(r, bytes) else r for r in res.as_numpy("finish_reason")]
    assert set(reasons) <= {"length", "eos_token"}


def test_server_and_model_metadata(server):
    client = _client(server)
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    meta = client.get_model_metadata(MODEL_NAME)
    assert meta["name"] == MODEL_NAME
    assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
    assert {o["name"] for o in meta["outputs"]} == {
        "text_output",
        "finish_reason",
        "prompt_tokens",
        "completion_tokens",
    }
    assert httpx.get(server.url + "/v2").json()["name"]


def _infer(server, body, model=MODEL_NAME, **kw):
    return httpx.post(f"{server.url}/v2/models/{model}/infer", timeout=60, **kw, json=body)


def _text(data, shape=None, datatype="BYTES", name="text_input"):
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


@pytest.mark.parametrize(
    ("body", "status", "needle"),
    [
        ({"inputs": [_text([1], datatype="INT32")]}, 400, "datatype BYTES"),
        ({"inputs": [_text(["a"], shape=[2])]}, 400, "shape [2] but 1 elements"),
        ({"inputs": [_text(["a"], shape=[1, 2])]}, 400, "shape [N] or [N, 1]"),
        ({"inputs": [_text(["a"], name="prompt")]}, 400, "named 'text_input'"),
        ({"inputs": [_text(["a"]), _text(["b"])]}, 400, "exactly one input"),
        ({"inputs": [_text([""])]}, 400, "prompt 0 is empty"),
        ({"inputs": [_text(["a"])], "parameters": {"temperature": "hot"}}, 400, "parameters.temperature"),
        ({"inputs": [_text(["a"])], "parameters": {"max_tokenz": 3}}, 400, "unknown parameter"),
        ({"inputs": [_text(["a"])], "parameters": {"top_k": -7}}, 400, "top_k"),
        ({"inputs": [_text(["a"])], "parameters": {"max_tokens": 5000}}, 400, "max_tokens"),
        ({"inputs": "text_input"}, 400, "inputs"),
        ({}, 400, "inputs"),
    ],
)
def test_v2_infer_client_errors_are_400_json(server, body, status, needle):
    r = _infer(server, body)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]


def test_v2_infer_malformed_json_is_400(server):
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/infer", content=b"{not json", timeout=30)
    assert r.status_code == 400 and "error" in r.json()


def test_v2_infer_prompt_longer_than_context_is_400(server):
    r = _infer(server, {"inputs": [_text(["hello " * 1500])]})
    assert r.status_code == 400, r.text
    assert "maximum context length" in r.json()["error"]


def test_v2_unknown_model_is_404(server):
    r = _infer(server, {"inputs": [_text(["a"])]}, model="nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]
    assert httpx.get(f"{server.url}/v2/models/nope").status_code == 404


def test_v1_predict_strings_and_objects(server, offline_reference):
    body = {
        "instances": [REFERENCE_PROMPTS[0], {"prompt": REFERENCE_PROMPTS[1], "max_tokens": 4}],
        "parameters": GREEDY,
    }
    r = httpx.post(f"{server.url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=60)
    assert r.status_code == 200, r.text
    first, second = r.json()["predictions"]
    assert first["text_output"] == offline_reference[0]["text"]
    assert second["completion_tokens"] == 4 and second["finish_reason"] == "length"
    # A per-instance max_tokens of 4 is a prefix of the 16-token greedy answer.
    assert offline_reference[1]["text"].startswith(second["text_output"])


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"instances": []}, "at least one instance"),
        ({"inputs": ["a"]}, "instances"),
        ({"instances": [5]}, "instances[0]"),
        ({"instances": ["a"], "parameters": {"seed": "x"}}, "parameters.seed"),
    ],
)
def test_v1_client_errors_are_400(server, body, needle):
    r = httpx.post(f"{server.url}/v1/models/{MODEL_NAME}:predict", json=body, timeout=30)
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]


def test_v1_unknown_model_is_404(server):
    r = httpx.post(f"{server.url}/v1/models/nope:predict", json={"instances": ["a"]}, timeout=30)
    assert r.status_code == 404

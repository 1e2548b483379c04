"""OIP V2 infer and KServe V1 predict: in-process over the fake engine (JSON and binary tensors, metadata,
client errors), token-exact against vLLM's offline output on the session server (tritonclient, httpx)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import httpx
import numpy as np
import pytest
import tritonclient.http as triton

from tests import inprocess
from tests.conftest import REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS
from tests.predictors.harness import MODEL_NAME, refused, v2_body

GREEDY = {"max_tokens": REFERENCE_MAX_TOKENS, "temperature": 0}
OUTPUTS = ("text_output", "finish_reason", "prompt_tokens", "completion_tokens")


def _outputs(body: dict[str, Any]) -> dict[str, list[Any]]:
    return {o["name"]: o["data"] for o in body["outputs"]}


def test_v2_infer_n_prompts():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/infer",
                json={**v2_body(["Hello", "Hi"], {"max_tokens": 3}), "id": "my-id"},
                headers={"x-request-id": "rid-1"},
            )
            assert r.status_code == 200, r.text
            body = r.json()
            assert body["model_name"] == MODEL_NAME and body["id"] == "my-id"
            assert [(o["name"], o["datatype"], o["shape"]) for o in body["outputs"]] == [
                ("text_output", "BYTES", [2]),
                ("finish_reason", "BYTES", [2]),
                ("prompt_tokens", "INT32", [2]),
                ("completion_tokens", "INT32", [2]),
            ]
            assert _outputs(body) == {
                "text_output": ["HEL", "HI"],
                "finish_reason": ["length", "eos_token"],
                "prompt_tokens": [5, 2],
                "completion_tokens": [3, 2],
            }
            # One engine request per prompt, named after the request id.
            assert sorted(s.engine.fake.requests) == ["rid-1-0", "rid-1-1"]
            # Shape [N, 1] is accepted too; a request without an id gets the request id back.
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/infer",
                json=v2_body([["a"], ["b"]], shape=[2, 1]),
                headers={"x-request-id": "rid-2"},
            )
            assert r.status_code == 200 and _outputs(r.json())["text_output"] == ["A", "B"]
            assert r.json()["id"] == "rid-2"

    asyncio.run(main())


@pytest.mark.parametrize("binary_output", [False, True])
def test_v2_infer_binary_tensors_as_tritonclient_sends_them(binary_output: bool):
    inp = triton.InferInput("text_input", [2], "BYTES")
    inp.set_data_from_numpy(np.array(["Hello", "héllo"], dtype=object), binary_data=True)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary_output) for name in OUTPUTS]
    body, json_size = triton.InferenceServerClient.generate_request_body(
        [inp], outputs=outputs, parameters={"max_tokens": 4}
    )

    async def main() -> tuple[bytes, dict[str, str]]:
        async with inprocess.server() as s, s.client() as c:
            # tritonclient sends no Content-Type for JSON: the server treats it as JSON.
            headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", content=body, headers=headers)
            assert r.status_code == 200, r.text
            return r.content, dict(r.headers)

    content, headers = asyncio.run(main())
    header_length = headers.get("inference-header-content-length")
    res = triton.InferResult.from_response_body(
        content, header_length=None if header_length is None else int(header_length)
    )
    texts = [t.decode() if isinstance(t, bytes) else t for t in res.as_numpy("text_output")]
    assert texts == ["HELL", "HÉLL"]
    assert list(res.as_numpy("completion_tokens")) == [4, 4]
    assert list(res.as_numpy("prompt_tokens")) == [5, 5]
    reasons = [r.decode() if isinstance(r, bytes) else r for r in res.as_numpy("finish_reason")]
    assert reasons == ["length", "length"]


@pytest.mark.parametrize("binary_output", [False, True])
def test_tritonclient_binary_requests_take_the_lean_path(binary_output: bool):
    """tritonclient's binary requests are parsed without KServe's models (`_lean_request`); shapes the lean
    path does not read (here an FP32 binary tensor, or a header length that cuts the JSON) fall back to
    KServe's decoding, which the tests above and the conformance run check."""
    from predictors.infer import _lean_request

    inp = triton.InferInput("text_input", [2], "BYTES")
    inp.set_data_from_numpy(np.array(["Hello", "héllo"], dtype=object), binary_data=True)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary_output) for name in OUTPUTS]
    body, json_size = triton.InferenceServerClient.generate_request_body([inp], outputs=outputs)
    lean = _lean_request(body, json_size)
    assert lean is not None and lean.inputs[0].data == [b"Hello", "héllo".encode()]
    assert lean.binary == (frozenset(OUTPUTS) if binary_output else frozenset())
    assert _lean_request(body, (json_size or len(body)) - 1) is None
    # `binary_data_output` and no outputs listed (as the bench sends it): every output raw.
    tensor = {"name": "text_input", "datatype": "BYTES", "shape": [1], "parameters": {"binary_data_size": 6}}
    header = json.dumps({"inputs": [tensor], "parameters": {"binary_data_output": True}}).encode()
    request = _lean_request(header + b"\x02\x00\x00\x00hi", len(header))
    assert request is not None and request.all_binary and request.inputs[0].data == [b"hi"]
    for odd in (
        [1],
        "x",
        {"binary_data_size": "6"},
        {"binary_data_size": 6, "other": 1},
    ):  # KServe's to refuse
        tensor = {"name": "text_input", "datatype": "BYTES", "shape": [1], "parameters": odd}
        assert _lean_request(json.dumps({"inputs": [tensor]}).encode(), None) is None
    other = triton.InferInput("x", [1], "FP32")
    other.set_data_from_numpy(np.array([1.0], dtype=np.float32), binary_data=True)
    body, json_size = triton.InferenceServerClient.generate_request_body([inp, other])
    assert _lean_request(body, json_size) is None


def test_v2_infer_without_content_type_is_json():
    # tritonclient sends JSON infer requests without a Content-Type.
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", content=json.dumps(v2_body(["ok"])).encode())
            assert "content-type" not in r.request.headers
            assert r.status_code == 200, r.text
            assert _outputs(r.json())["text_output"] == ["OK"]

    asyncio.run(main())


def test_server_and_model_metadata():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            meta = (await c.get(f"/v2/models/{MODEL_NAME}")).json()
            assert meta["name"] == MODEL_NAME
            assert meta["inputs"] == [{"name": "text_input", "datatype": "BYTES", "shape": [-1]}]
            assert [o["name"] for o in meta["outputs"]] == list(OUTPUTS)
            assert (await c.get("/v2")).json()["name"]
            assert (await c.get(f"/v2/models/{MODEL_NAME}/ready")).json()["ready"] is True
            assert (await c.get(f"/v1/models/{MODEL_NAME}")).json()["ready"] is True
            r = await c.get("/v2/models/nope")
            assert r.status_code == 404 and "nope" in r.json()["error"]
            assert s.engine.fake.requests == []

    asyncio.run(main())


def _text(
    data: list[Any], shape: list[int] | None = None, datatype: str = "BYTES", name: str = "text_input"
) -> dict:
    return {"name": name, "datatype": datatype, "shape": shape or [len(data)], "data": data}


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"inputs": [_text([1], datatype="INT32")]}, "datatype BYTES"),
        ({"inputs": [_text(["a"], shape=[2])]}, "shape [2] but 1 elements"),
        ({"inputs": [_text(["a"], shape=[1, 2])]}, "shape [N] or [N, 1]"),
        ({"inputs": [_text([], shape=[0])]}, "N >= 1"),
        ({"inputs": [_text(["a"], name="prompt")]}, "named 'text_input'"),
        ({"inputs": [_text(["a"]), _text(["b"])]}, "appears twice"),
        ({"inputs": [_text([""])]}, "prompt 0 is empty"),
        ({"inputs": [_text([5])]}, "text_input[0] must be a string"),
        ({"inputs": [_text(["a"])], "parameters": {"temperature": "hot"}}, "parameters.temperature"),
        ({"inputs": [_text(["a"])], "parameters": {"max_tokenz": 3}}, "unknown parameter"),
        ({"inputs": [_text(["a"])], "parameters": {"top_k": -7}}, "top_k"),
        ({"inputs": [_text(["a"])], "outputs": [{"name": "text"}]}, "unexpected inference output 'text'"),
        # Triton's additional outputs exist when their switch asks for them.
        (
            {"inputs": [_text(["a"])], "outputs": [{"name": "cumulative_logprob"}]},
            "'return_cumulative_logprob'",
        ),
        ({"inputs": [_text(["a"])], "parameters": {"max_tokens": 5000}}, "maximum context length"),
        ({"inputs": [_text(["hello " * 1500])]}, "maximum context length"),
        ({"inputs": "text_input"}, "inputs"),
        ({}, "inputs"),
    ],
)
def test_v2_infer_client_errors_are_400_json(body: dict[str, Any], needle: str):
    refused(f"/v2/models/{MODEL_NAME}/infer", 400, needle, json=body)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v2/models/{}/infer", v2_body(["a"])),
        ("/v1/models/{}:predict", {"instances": ["a"]}),
    ],
)
def test_malformed_json_is_400_and_an_unknown_model_404(path: str, body: dict[str, Any]):
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(path.format(MODEL_NAME), content=b"{not json")
            assert r.status_code == 400 and isinstance(r.json()["error"], str)
            r = await c.post(path.format("nope"), json=body)
            assert r.status_code == 404 and "nope" in r.json()["error"]
            assert s.engine.fake.requests == []

    asyncio.run(main())


@pytest.mark.parametrize(
    "content",
    [
        b"1.5",  # a JSON header that is not an infer request
        b"{}",
        # a BYTES tensor whose length prefix claims more bytes than follow
        json.dumps(
            {
                "inputs": [
                    {
                        "name": "text_input",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 8},
                    }
                ]
            }
        ).encode()
        + b"\xff\x00\x00\x00ab",
    ],
)
def test_v2_binary_requests_kserve_cannot_decode_are_400(content: bytes):
    """KServe decodes binary-tensor requests before evllm sees them; its failures are the client's 400."""
    header = content.split(b"\xff")[0]

    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/infer",
                content=content,
                headers={"inference-header-content-length": str(len(header))},
            )
            assert r.status_code == 400 and isinstance(r.json()["error"], str), r.text
            assert s.engine.fake.requests == []

    asyncio.run(main())


def test_v1_predict_strings_and_objects():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            body = {
                "instances": ["Hello", {"prompt": "World", "max_tokens": 2}, {"prompt": "abc"}],
                "parameters": {"max_tokens": 4},
            }
            r = await c.post(f"/v1/models/{MODEL_NAME}:predict", json=body, headers={"x-request-id": "v1"})
            assert r.status_code == 200, r.text
            assert r.json() == {
                "predictions": [
                    {
                        "text_output": "HELL",
                        "finish_reason": "length",
                        "prompt_tokens": 5,
                        "completion_tokens": 4,
                    },
                    {
                        "text_output": "WO",
                        "finish_reason": "length",
                        "prompt_tokens": 5,
                        "completion_tokens": 2,
                    },
                    {
                        "text_output": "ABC",
                        "finish_reason": "eos_token",
                        "prompt_tokens": 3,
                        "completion_tokens": 3,
                    },
                ]
            }
            # Instances that share parameters share one batch; an instance's own values make its own.
            assert sorted(s.engine.fake.requests) == ["v1-0-0", "v1-0-1", "v1-1-0"]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("body", "needle"),
    [
        ({"instances": []}, "at least one instance"),
        ({"inputs": ["a"]}, "instances"),
        ({"instances": [5]}, "instances[0]"),
        ({"instances": [{"text": "a"}]}, "instances[0]"),
        ({"instances": ["a"], "parameters": {"seed": "x"}}, "parameters.seed"),
        ({"instances": ["a"], "parameters": [1]}, "parameters must be a JSON object"),
        ({"instances": [{"prompt": "a", "temprature": 1}]}, "parameters.temprature: unknown parameter"),
    ],
)
def test_v1_client_errors_are_400(body: dict[str, Any], needle: str):
    refused(f"/v1/models/{MODEL_NAME}:predict", 400, needle, json=body)


# Token-exact on the real engine --------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("binary", [False, True])
def test_v2_infer_matches_offline_with_tritonclient(server, offline_reference, binary):
    client = triton.InferenceServerClient(url=server.url.removeprefix("http://"))
    assert client.is_server_live() and client.is_server_ready() and client.is_model_ready(MODEL_NAME)
    inp = triton.InferInput("text_input", [len(REFERENCE_PROMPTS)], "BYTES")
    inp.set_data_from_numpy(np.array(REFERENCE_PROMPTS, dtype=object), binary_data=binary)
    outputs = [triton.InferRequestedOutput(name, binary_data=binary) for name in OUTPUTS]
    res = client.infer(MODEL_NAME, [inp], outputs=outputs, parameters=GREEDY)
    texts = [t.decode() if isinstance(t, bytes) else t for t in res.as_numpy("text_output")]
    assert texts == [r["text"] for r in offline_reference]
    assert list(res.as_numpy("completion_tokens")) == [len(r["token_ids"]) for r in offline_reference]
    assert all(int(n) > 0 for n in res.as_numpy("prompt_tokens"))
    reasons = [r.decode() if isinstance(r, bytes) else r for r in res.as_numpy("finish_reason")]
    assert set(reasons) <= {"length", "eos_token"}


@pytest.mark.slow
def test_v1_predict_matches_offline(server, offline_reference):
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


def test_lean_json_path_answers_as_kserves_decoding_does():
    """Plain JSON requests skip KServe's pydantic models and InferRequest/InferResponse (the lean path);
    anything else (here: tensor parameters) goes through KServe's decoding. Same answers either way,
    requested outputs included."""
    plain = {**v2_body(["Hello", "Hi"], {"max_tokens": 3}), "id": "x1"}
    plain["outputs"] = [{"name": "text_output"}, {"name": "completion_tokens"}]
    unusual = json.loads(json.dumps(plain))
    unusual["inputs"][0]["parameters"] = {"note": "kserve path"}

    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            a = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=plain)
            b = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=unusual)
            assert a.status_code == b.status_code == 200, (a.text, b.text)
            assert (
                a.json()
                == b.json()
                == {
                    "id": "x1",
                    "model_name": MODEL_NAME,
                    "model_version": "1",
                    "outputs": [
                        {"name": "text_output", "shape": [2], "datatype": "BYTES", "data": ["HEL", "HI"]},
                        {"name": "completion_tokens", "shape": [2], "datatype": "INT32", "data": [3, 2]},
                    ],
                }
            )
            # An empty list asks for nothing in particular: every output, as when `outputs` is absent.
            for body in (plain, unusual):
                r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json={**body, "outputs": []})
                assert [o["name"] for o in r.json()["outputs"]] == list(OUTPUTS), r.text
            # A misspelt output is the client's 400 on both paths, before anything reaches the engine.
            engine_requests = len(s.engine.fake.requests)
            for body in (plain, unusual):
                r = await c.post(
                    f"/v2/models/{MODEL_NAME}/infer", json={**body, "outputs": [{"name": "text_ouput"}]}
                )
                assert r.status_code == 400, r.text
                assert r.json()["error"].startswith("unexpected inference output 'text_ouput'")
            assert len(s.engine.fake.requests) == engine_requests

    asyncio.run(main())

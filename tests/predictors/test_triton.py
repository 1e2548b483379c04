"""Triton vLLM-backend clients, unchanged: the bodies its README and CI send (vllm_backend commit
8de0c148, README.md, samples/client.py, ci/common/test_util.py, ci/L0_additional_outputs_vllm), with
Triton's meaning (predictors/triton.py). V2 infer bodies are encoded and decoded by tritonclient.http
itself (its request builder and response parser), sent in-process over the fake engine."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import numpy as np
import pytest
import tritonclient.http as triton

from tests import inprocess
from tests.inprocess import fake_logprob
from tests.predictors.harness import MODEL_NAME, sse

SAMPLING = {"temperature": "0.1", "top_p": "0.95", "max_tokens": "3"}  # samples/client.py's, as strings


def _generate(body: dict[str, Any], path: str = "generate") -> Any:
    async def main() -> Any:
        async with inprocess.server() as s, s.client() as c:
            return await c.post(f"/v2/models/{MODEL_NAME}/{path}", json=body)

    return asyncio.run(main())


def test_readme_generate_body():
    # vllm_backend README: {"text_input": ..., "parameters": {"stream": false, "temperature": 0}}
    r = _generate({"text_input": "What is Triton", "parameters": {"stream": False, "temperature": 0}})
    assert r.status_code == 200, r.text
    assert r.json()["text_output"] == "WHAT IS TRITON"


def test_generate_with_triton_switches_at_top_level_and_in_parameters():
    switches = {
        "exclude_input_in_output": False,
        "return_finish_reason": True,
        "return_cumulative_logprob": True,
        "return_num_input_tokens": True,
        "return_num_output_tokens": True,
    }
    for body in (
        {"text_input": "Hello", "parameters": {"max_tokens": 2, **switches}},
        {"text_input": "Hello", "parameters": {"max_tokens": 2}, **switches},
    ):
        r = _generate(body)
        assert r.status_code == 200, r.text
        out = r.json()
        assert out["text_output"] == "HelloHE"  # exclude_input_in_output=false prepends the prompt
        assert out["finish_reason"] == "length"
        assert out["cumulative_logprob"] == fake_logprob(0) + fake_logprob(1)
        assert (out["num_input_tokens"], out["num_output_tokens"]) == (5, 2)


def test_return_logprobs_is_tritons_json_string():
    r = _generate({"text_input": "Hi", "parameters": {"logprobs": 1, "return_logprobs": True}})
    assert json.loads(r.json()["logprobs"]) == [
        {str(ord("H")): {"logprob": fake_logprob(0), "rank": 1, "decoded_token": "H"}},
        {str(ord("I")): {"logprob": fake_logprob(1), "rank": 1, "decoded_token": "I"}},
    ]
    # Without the sampling parameter `logprobs`, Triton answers null.
    r = _generate({"text_input": "Hi", "return_logprobs": True})
    assert r.json()["logprobs"] == "null"


def test_sampling_parameters_string_replaces_parameters():
    body = {
        "text_input": "Hello",
        "sampling_parameters": json.dumps(SAMPLING),
        "parameters": {"max_tokens": 1},
    }
    r = _generate(body)
    assert r.status_code == 200, r.text
    assert r.json()["completion_tokens"] == 3


def test_generate_stream_with_stream_false_sends_one_event():
    r = _generate(
        {"text_input": "Hello", "parameters": {"max_tokens": 3}, "stream": False}, "generate_stream"
    )
    (event,) = sse(r.text)
    assert event["text_output"] == "HEL" and event["completion_tokens"] == 3


@pytest.mark.parametrize(
    ("path", "body", "needle"),
    [
        ("generate", {"text_input": "a", "stream": True}, "generate_stream"),
        ("generate_stream", {"text_input": "a", "exclude_input_in_output": False}, "not allowed"),
        ("generate", {"text_input": "a", "return_logprobs": "yes"}, "return_logprobs must be a boolean"),
        ("generate", {"text_input": "a", "parameters": {"max_token": 3}}, "did you mean max_tokens"),
        ("generate", {"text_input": "a", "sampling_parameters": "{"}, "sampling_parameters"),
    ],
)
def test_triton_mistakes_are_422_naming_them(path: str, body: dict[str, Any], needle: str):
    r = _generate(body, path)
    assert r.status_code == 422 and needle in r.json()["error"], r.text


# tritonclient.http V2 infer --------------------------------------------------------------------------
def _inputs(prompt: str, **tensors: Any) -> list[Any]:
    """ci/common/test_util.py's create_vllm_request inputs (stream, sampling_parameters, switches)."""
    inputs = [triton.InferInput("text_input", [1], "BYTES")]
    inputs[-1].set_data_from_numpy(np.array([prompt.encode("utf-8")], dtype=np.object_))
    for name, value in tensors.items():
        if name == "sampling_parameters":
            inputs.append(triton.InferInput(name, [1], "BYTES"))
            inputs[-1].set_data_from_numpy(np.array([json.dumps(value).encode("utf-8")], dtype=np.object_))
        else:
            inputs.append(triton.InferInput(name, [1], "BOOL"))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=bool))
    return inputs


def _infer(inputs: list[Any], **kwargs: Any) -> Any:
    body, json_size = triton.InferenceServerClient.generate_request_body(inputs, **kwargs)
    headers = {} if json_size is None else {"Inference-Header-Content-Length": str(json_size)}

    async def main() -> Any:
        async with inprocess.server() as s, s.client() as c:
            return await c.post(f"/v2/models/{MODEL_NAME}/infer", content=body, headers=headers)

    r = asyncio.run(main())
    if r.status_code != 200:
        return r
    length = r.headers.get("inference-header-content-length")
    return triton.InferenceServerClient.parse_response_body(
        r.content, header_length=None if length is None else int(length)
    )


def test_tritonclient_infer_with_vllm_backend_tensors():
    inputs = _inputs(
        "Hello",
        stream=False,
        sampling_parameters=SAMPLING,
        exclude_input_in_output=True,
        return_num_input_tokens=True,
        return_num_output_tokens=True,
        return_cumulative_logprob=True,
    )
    result = _infer(inputs, request_id="1", parameters=SAMPLING)
    assert result.as_numpy("text_output").tolist() == [b"HEL"]
    assert result.as_numpy("num_input_tokens").tolist() == [5]
    assert result.as_numpy("num_output_tokens").tolist() == [3]
    assert result.as_numpy("cumulative_logprob").tolist() == [sum(fake_logprob(i) for i in range(3))]


def test_tritonclient_infer_request_parameters_and_prepended_input():
    # create_vllm_request's shape: only text_output requested (binary), parameters as request parameters.
    outputs = [triton.InferRequestedOutput("text_output", binary_data=True)]
    result = _infer(
        _inputs("Hi", exclude_input_in_output=False), outputs=outputs, parameters={"max_tokens": "1"}
    )
    assert result.as_numpy("text_output").tolist() == [b"HiH"]
    assert result.as_numpy("finish_reason") is None  # not requested


def test_tritonclient_infer_stream_true_needs_a_streaming_transport():
    r = _infer(_inputs("Hi", stream=True))
    assert r.status_code == 400 and "ModelStreamInfer" in r.json()["error"]

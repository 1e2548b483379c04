"""Limits: body bytes (413), prompts per request, prompt tokens, max_tokens, batch lines, event size."""

from __future__ import annotations

import argparse

import httpx
import pytest

from predictors.errors import InvalidInput, PayloadTooLarge, ValidationFailed
from predictors.limits import Limits, add_arguments
from tests.conftest import MODEL_NAME
from tests.predictors.conftest import (
    MAX_EVENT_BYTES,
    MAX_PROMPT_TOKENS,
    MAX_PROMPTS,
    MAX_REQUEST_BYTES,
    MAX_TOKENS_LIMIT,
)


def test_flags_build_the_limits():
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    limits = Limits.from_args(parser.parse_args(["--max_batch_lines", "7", "--max_tokens_limit", "9"]))
    assert limits.max_batch_lines == 7 and limits.max_tokens == 9
    assert limits.max_prompt_tokens is None and limits.max_request_bytes == 8 * 1024 * 1024


def test_checks_name_the_limit():
    limits = Limits(max_prompts_per_request=2, max_prompt_tokens=5, max_tokens=10, max_batch_lines=3)
    limits.check_prompts(2)
    with pytest.raises(InvalidInput, match="3 prompts in one request; the limit is 2"):
        limits.check_prompts(3)
    with pytest.raises(ValidationFailed, match="prompt has 6 tokens; the limit is 5"):
        limits.check_prompt_tokens(6, ValidationFailed)
    with pytest.raises(InvalidInput, match="max_tokens=11 is above the limit of 10"):
        limits.check_max_tokens(11)
    # Eventing's batch acceptance calls this with the job's line count.
    limits.check_batch_lines(3)
    with pytest.raises(InvalidInput, match="batch job has 4 lines; the limit is 3"):
        limits.check_batch_lines(4)
    with pytest.raises(PayloadTooLarge):
        Limits(max_request_bytes=10).check_body_size("/v2/models/m/infer", 11)
    Limits(max_request_bytes=10, max_event_bytes=100).check_body_size("/events", 50)
    with pytest.raises(InvalidInput, match="max_completion_tokens=11"):
        limits.check_openai_body(b'{"max_completion_tokens": 11}')
    limits.check_openai_body(b"not json")  # vLLM answers that one with its own 400


# Against the hardened server ------------------------------------------------------------------------
def _infer(prompts: list[str], parameters: dict | None = None) -> dict:
    body: dict = {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [len(prompts)], "data": prompts}]
    }
    if parameters:
        body["parameters"] = parameters
    return body


@pytest.mark.slow
def test_body_size_limits(hardened):
    h = hardened.headers
    big = {"text_input": "x" * (MAX_REQUEST_BYTES + 10)}
    r = httpx.post(f"{hardened.url}/v2/models/{MODEL_NAME}/generate", json=big, headers=h, timeout=30)
    assert r.status_code == 413 and str(MAX_REQUEST_BYTES) in r.json()["error"]

    # Chunked upload (no Content-Length): counted as it arrives.
    def chunks():
        for _ in range(MAX_REQUEST_BYTES // 1024 + 2):
            yield b"x" * 1024

    r = httpx.post(f"{hardened.url}/openai/v1/completions", content=chunks(), headers=h, timeout=30)
    assert r.status_code == 413 and "larger than" in r.json()["error"]
    # Events have their own, larger limit.
    r = httpx.post(
        f"{hardened.url}/events", content=b"{" + b" " * (MAX_EVENT_BYTES + 1) + b"}", headers=h, timeout=30
    )
    assert r.status_code == 413 and str(MAX_EVENT_BYTES) in r.json()["error"]
    mid = b'{"data": "' + b"x" * (MAX_REQUEST_BYTES + 100) + b'"}'
    r = httpx.post(
        f"{hardened.url}/events",
        content=mid,
        headers={**h, "content-type": "application/cloudevents+json"},
        timeout=30,
    )
    assert r.status_code == 400, r.text  # past the request limit, within the event limit: a bad event


@pytest.mark.slow
def test_prompt_count_prompt_tokens_and_max_tokens(hardened):
    h, url = hardened.headers, hardened.url
    too_many = ["a"] * (MAX_PROMPTS + 1)
    r = httpx.post(f"{url}/v2/models/{MODEL_NAME}/infer", json=_infer(too_many), headers=h, timeout=30)
    assert r.status_code == 400 and f"the limit is {MAX_PROMPTS}" in r.json()["error"]
    r = httpx.post(
        f"{url}/v1/models/{MODEL_NAME}:predict", json={"instances": too_many}, headers=h, timeout=30
    )
    assert r.status_code == 400 and f"the limit is {MAX_PROMPTS}" in r.json()["error"]

    long_prompt = " ".join(["hello world"] * MAX_PROMPT_TOKENS)
    r = httpx.post(f"{url}/v2/models/{MODEL_NAME}/infer", json=_infer([long_prompt]), headers=h, timeout=30)
    assert r.status_code == 400 and f"the limit is {MAX_PROMPT_TOKENS}" in r.json()["error"]
    r = httpx.post(
        f"{url}/v2/models/{MODEL_NAME}/generate_stream",
        json={"text_input": long_prompt},
        headers=h,
        timeout=30,
    )
    assert r.status_code == 422 and f"the limit is {MAX_PROMPT_TOKENS}" in r.json()["error"]
    r = httpx.post(
        f"{url}/openai/v1/completions",
        json={"model": MODEL_NAME, "prompt": long_prompt, "max_tokens": 4},
        headers=h,
        timeout=30,
    )
    assert r.status_code == 400 and f"the limit is {MAX_PROMPT_TOKENS}" in r.json()["error"]["message"]

    over = {"max_tokens": MAX_TOKENS_LIMIT + 1}
    r = httpx.post(f"{url}/v2/models/{MODEL_NAME}/infer", json=_infer(["hi"], over), headers=h, timeout=30)
    assert r.status_code == 400 and f"limit of {MAX_TOKENS_LIMIT}" in r.json()["error"]
    r = httpx.post(
        f"{url}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": "hi", "parameters": over},
        headers=h,
        timeout=30,
    )
    assert r.status_code == 422 and f"limit of {MAX_TOKENS_LIMIT}" in r.json()["error"]
    r = httpx.post(
        f"{url}/openai/v1/chat/completions",
        json={
            "model": MODEL_NAME,
            "messages": [{"role": "user", "content": "hi"}],
            "max_completion_tokens": 9999,
        },
        headers=h,
        timeout=30,
    )
    assert r.status_code == 400 and f"limit of {MAX_TOKENS_LIMIT}" in r.json()["error"]
    # Unset max_tokens on OpenAI chat ("until the context is full") is clamped to the limit, not refused.
    r = httpx.post(
        f"{url}/openai/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "ignore_eos": True},
        headers=h,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS_LIMIT
    # Within every limit: served.
    r = httpx.post(
        f"{url}/v2/models/{MODEL_NAME}/infer",
        json=_infer(["a", "b", "c"], {"max_tokens": 3}),
        headers=h,
        timeout=60,
    )
    assert r.status_code == 200, r.text

"""The generate extension: /generate and /generate_stream (SSE).

In-process over the fake engine (validation, shapes, routing); token-exact against vLLM's offline output
on the session server.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from tests import inprocess
from tests.conftest import REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS
from tests.inprocess import fake_logprob
from tests.predictors.harness import MODEL_NAME, refused, sse

GREEDY = {"max_tokens": REFERENCE_MAX_TOKENS, "temperature": 0}


VERSION = {"model_name": MODEL_NAME, "model_version": "1"}


def test_generate_answers_with_text_reason_and_token_counts():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/generate",
                json={"text_input": "Hello", "parameters": {"max_tokens": 2, "details": True}},
                headers={"x-request-id": "gen-1"},
            )
            assert r.status_code == 200, r.text
            # details: the engine's logprob of each sampled token (the spec's Token).
            assert r.json() == {
                "model_name": MODEL_NAME,
                "model_version": "1",
                "text_output": "HE",
                "finish_reason": "length",
                "prompt_tokens": 5,
                "completion_tokens": 2,
                "details": {
                    "finish_reason": "length",
                    "logprobs": [
                        {"id": ord("H"), "text": "H", "logprob": fake_logprob(0), "special": False},
                        {"id": ord("E"), "text": "E", "logprob": fake_logprob(1), "special": False},
                    ],
                },
            }
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "Hi", "id": "x"})
            assert r.json()["finish_reason"] == "eos_token" and "details" not in r.json()
            # Online work runs at the highest priority, under the client's request id.
            assert s.engine.fake.requests[0] == "gen-1-0" and s.engine.fake.priorities == [0, 0]

    asyncio.run(main())


def test_generate_stream_sends_one_event_per_delta():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/generate_stream",
                json={"text_input": "Hello", "parameters": {"max_tokens": 3}},
                headers={"x-request-id": "stream-1"},
            )
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/event-stream")
            events = sse(r.text)
            assert events == [
                {**VERSION, "text_output": "H", "finish_reason": None},
                {**VERSION, "text_output": "E", "finish_reason": None},
                {**VERSION, "text_output": "L", "finish_reason": "length", "prompt_tokens": 5,
                 "completion_tokens": 3},
            ]  # fmt: skip
            assert s.engine.fake.requests == ["stream-1"]

    asyncio.run(main())


@pytest.mark.parametrize("path", ["generate", "generate_stream"])
@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{nope", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"parameters": {}}).encode(), "text_input is required"),
        (json.dumps({"text_input": 7}).encode(), "text_input is required and must be a string"),
        (json.dumps({"text_input": "a", "prompt": "b"}).encode(), "unknown field(s): prompt"),
        (json.dumps({"text_input": ""}).encode(), "prompt 0 is empty"),
        (
            json.dumps({"text_input": "a", "parameters": {"temperature": -1}}).encode(),
            "parameters.temperature",
        ),
        (json.dumps({"text_input": "a", "parameters": {"top_k": -7}}).encode(), "top_k"),
        (json.dumps({"text_input": "a", "parameters": []}).encode(), "parameters must be a JSON object"),
        (json.dumps({"text_input": "a", "parameters": {"max_tokens": 99999}}).encode(), "max_tokens"),
        (json.dumps({"text_input": "hello " * 1500}).encode(), "maximum context length"),
    ],
)
def test_generate_validation_errors_are_422(path: str, content: bytes, needle: str):
    # The OIP generate spec answers input validation errors with 422 {"error": ...}, before any streaming.
    refused(f"/v2/models/{MODEL_NAME}/{path}", 422, needle, content=content)


def test_generate_unknown_model_is_404_and_versions_are_ignored():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            for path in ("generate", "generate_stream"):
                r = await c.post(f"/v2/models/nope/{path}", json={"text_input": "a"})
                assert r.status_code == 404 and r.json() == {
                    "error": "Model with name nope does not exist. Served models: demo."
                }
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/versions/1/generate",
                json={"text_input": "Hello", "parameters": {"max_tokens": 2}},
            )
            assert r.status_code == 200 and r.json()["completion_tokens"] == 2
            r = await c.post(f"/v2/models/{MODEL_NAME}/versions/1/generate_stream", json={"text_input": "Hi"})
            assert r.status_code == 200 and sse(r.text)[-1]["completion_tokens"] == 2
            assert len(s.engine.fake.requests) == 2

    asyncio.run(main())


# Token-exact on the real engine --------------------------------------------------------------------------
@pytest.mark.slow
def test_generate_matches_offline(server, offline_reference):
    for prompt, ref in zip(REFERENCE_PROMPTS, offline_reference, strict=True):
        r = httpx.post(
            f"{server.url}/v2/models/{MODEL_NAME}/generate",
            json={"text_input": prompt, "parameters": GREEDY},
            timeout=60,
        )
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["model_name"] == MODEL_NAME
        assert body["text_output"] == ref["text"]
        assert body["completion_tokens"] == len(ref["token_ids"])
        assert body["finish_reason"] in {"length", "eos_token"}


@pytest.mark.slow
def test_generate_stream_deltas_join_to_offline(server, offline_reference):
    with httpx.stream(
        "POST",
        f"{server.url}/v2/models/{MODEL_NAME}/generate_stream",
        json={"text_input": REFERENCE_PROMPTS[1], "parameters": GREEDY},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse(r.read().decode())
    assert len(events) > 1, "one event per delta, not one blob"
    assert "".join(e["text_output"] for e in events) == offline_reference[1]["text"]
    assert all(e["finish_reason"] is None for e in events[:-1])
    last = events[-1]
    assert last["finish_reason"] in {"length", "eos_token"}
    assert last["completion_tokens"] == len(offline_reference[1]["token_ids"])


@pytest.mark.slow
def test_stop_sequence_reason(server, offline_reference):
    text = offline_reference[0]["text"]
    stop = text[len(text) // 2 : len(text) // 2 + 2]
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": REFERENCE_PROMPTS[0], "parameters": {**GREEDY, "stop": [stop]}},
        timeout=60,
    )
    body = r.json()
    assert body["finish_reason"] == "stop_sequence"
    assert text.startswith(body["text_output"]) and len(body["text_output"]) < len(text)

"""The generate extension: /generate and /generate_stream (SSE), with httpx."""

import json

import httpx
import pytest

from tests.conftest import MODEL_NAME, REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS

pytestmark = pytest.mark.slow
GREEDY = {"max_tokens": REFERENCE_MAX_TOKENS, "temperature": 0}


def sse_events(response: httpx.Response) -> list[dict]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            events.append(json.loads(line.removeprefix("data: ")))
        else:
            assert line == "", line
    return events


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


def test_generate_details_flag(server):
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": "Hello", "parameters": {"max_tokens": 2, "details": True}},
        timeout=60,
    )
    assert r.json()["details"]["finish_reason"] == "length"


def test_generate_stream_deltas_join_to_offline(server, offline_reference):
    with httpx.stream(
        "POST",
        f"{server.url}/v2/models/{MODEL_NAME}/generate_stream",
        json={"text_input": REFERENCE_PROMPTS[1], "parameters": GREEDY},
        timeout=60,
    ) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert len(events) > 1, "one event per delta, not one blob"
    assert "".join(e["text_output"] for e in events) == offline_reference[1]["text"]
    assert all(e["finish_reason"] is None for e in events[:-1])
    last = events[-1]
    assert last["finish_reason"] in {"length", "eos_token"}
    assert last["completion_tokens"] == len(offline_reference[1]["token_ids"])


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


@pytest.mark.parametrize("path", ["generate", "generate_stream"])
@pytest.mark.parametrize(
    ("content", "needle"),
    [
        (b"{nope", "not valid JSON"),
        (b"[]", "JSON object"),
        (json.dumps({"parameters": {}}).encode(), "text_input is required"),
        (json.dumps({"text_input": 7}).encode(), "text_input is required and must be a string"),
        (json.dumps({"text_input": "a", "prompt": "b"}).encode(), "unknown field(s): prompt"),
        (
            json.dumps({"text_input": "a", "parameters": {"temperature": -1}}).encode(),
            "parameters.temperature",
        ),
        (json.dumps({"text_input": "a", "parameters": {"max_tokens": 99999}}).encode(), "max_tokens"),
        (json.dumps({"text_input": "hello " * 1500}).encode(), "maximum context length"),
    ],
)
def test_generate_validation_errors(server, path, content, needle):
    # The OIP generate spec answers input validation errors with 422 {"error": ...}, before any streaming.
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/{path}", content=content, timeout=30)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]


@pytest.mark.parametrize("path", ["generate", "generate_stream"])
def test_generate_unknown_model_is_404(server, path):
    r = httpx.post(f"{server.url}/v2/models/nope/{path}", json={"text_input": "a"}, timeout=30)
    assert r.status_code == 404 and "nope" in r.json()["error"]


def test_versioned_generate_path(server):
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL_NAME}/versions/1/generate",
        json={"text_input": "Hello", "parameters": {"max_tokens": 2}},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["completion_tokens"] == 2

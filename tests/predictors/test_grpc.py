"""OIP V2 over gRPC with Triton's own client (tritonclient.grpc, sync and streaming; in a process of its
own, see triton_grpc_client.py) against a real grpc.aio server on a free port, serving the in-process
app's data plane over the fake engine: the same answers as HTTP, token for token."""

from __future__ import annotations

import asyncio
import contextlib
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from typing import Any

import grpc
import httpx
import pytest

from predictors.auth import Authenticator
from predictors.oip_grpc import Servicer, serve_on
from tests import inprocess
from tests.conftest import REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS
from tests.predictors.harness import MODEL_NAME, sse

API_KEY = "grpc-key-0123456789"


class Served:
    """The in-process server and its gRPC port, on an event loop in a thread (the client blocks)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, server: inprocess.InProcess, url: str):
        self.loop, self.server, self.url = loop, server, url

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(30)

    def http(self, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> Any:
        async def post() -> Any:
            async with self.server.client(headers=headers or {}) as c:
                return await c.post(path, json=body)

        return self.run(post())


@contextlib.contextmanager
def served(argv: list[str] | None = None, delay: float = 0.0) -> Iterator[Served]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()

    def run(coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, loop).result(30)

    cm = inprocess.server(argv or [], delay=delay)
    s = run(cm.__aenter__())

    async def start() -> tuple[Any, int]:
        server = grpc.aio.server()
        auth = Authenticator(s.settings.auth)
        serve_on(server, Servicer(s.kserve.dataplane, s.kserve.model_repository_extension, s.dataplane,
                                  s.admission, auth))  # fmt: skip
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        return server, port

    server, port = run(start())
    try:
        yield Served(loop, s, f"127.0.0.1:{port}")
    finally:
        run(server.stop(None))
        run(cm.__aexit__(None, None, None))
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)
        loop.close()


def triton_client(url: str, ops: list[dict[str, Any]]) -> list[Any]:
    done = subprocess.run(
        [sys.executable, "-m", "tests.predictors.triton_grpc_client", url],
        input=json.dumps(ops),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return list(json.loads(done.stdout))


def request(prompts: list[str], **fields: Any) -> dict[str, Any]:
    return {"prompts": prompts, **fields}


def test_health_and_metadata():
    with served() as s:
        live, ready, model_ready, versioned, meta, server_meta, missing = triton_client(s.url, [
            {"op": "live"},
            {"op": "ready"},
            {"op": "model_ready", "model": MODEL_NAME},
            {"op": "model_ready", "model": MODEL_NAME, "version": "1"},
            {"op": "model_metadata", "model": MODEL_NAME},
            {"op": "server_metadata"},
            {"op": "model_metadata", "model": "nope"},
        ])  # fmt: skip
        assert live and ready and model_ready and versioned
        assert meta["versions"] == ["1"] and meta["inputs"][0]["name"] == "text_input"
        assert server_meta["extensions"] == ["generate"]
        assert missing["error"]["status"] == "StatusCode.NOT_FOUND"


def test_model_infer_matches_http():
    prompts = ["Hello world", "The quick"]
    with served() as s:
        (result,) = triton_client(s.url, [
            {"op": "infer", "request": request(prompts, parameters={"max_tokens": 4}, request_id="r1")},
        ])  # fmt: skip
        r = s.http(f"/v2/models/{MODEL_NAME}/infer",
                   {"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": prompts}],
                    "parameters": {"max_tokens": 4}})  # fmt: skip
        http = {o["name"]: o["data"] for o in r.json()["outputs"]}
        assert result["outputs"] == http
        assert http["text_output"] == ["HELL", "THE "] and http["completion_tokens"] == [4, 4]
        assert result["id"] == "r1" and result["model_version"] == "1"


def test_only_the_outputs_asked_for_unary_and_streaming():
    """As over HTTP (and in Triton): listed outputs only; a misspelt one is INVALID_ARGUMENT."""
    asked = ["completion_tokens", "text_output"]
    with served() as s:
        unary, streamed, misspelt = triton_client(s.url, [
            {"op": "infer", "request": request(["Hello"], parameters={"max_tokens": 3}, outputs=asked)},
            {"op": "stream", "requests": [request(["Hi"], tensors={"stream": True},
                                                  parameters={"max_tokens": 2}, outputs=asked)]},
            {"op": "infer", "request": request(["Hello"], outputs=["text"])},
        ])  # fmt: skip
        assert unary["outputs"] == {"text_output": ["HEL"], "completion_tokens": [3]}
        assert [a["outputs"] for a in streamed] == [
            {"text_output": ["H"]},
            {"text_output": ["I"], "completion_tokens": [2]},
        ]
        assert misspelt["error"]["status"] == "StatusCode.INVALID_ARGUMENT"
        assert "unexpected inference output 'text'" in misspelt["error"]["message"]


def test_model_infer_errors_are_grpc_statuses():
    with served() as s:
        results = triton_client(s.url, [
            {"op": "infer", "request": request(["Hi"], model="nope")},
            {"op": "infer", "request": request(["Hi"], version="7")},
            {"op": "infer", "request": request(["Hi"], parameters={"max_token": 3})},
            {"op": "infer", "request": request(["Hi"], parameters={"max_tokens": 999})},
            {"op": "infer", "request": request(["Hi"], tensors={"stream": True})},
        ])  # fmt: skip
        expected = [
            ("NOT_FOUND", "nope"),
            ("NOT_FOUND", "version 7"),
            ("INVALID_ARGUMENT", "did you mean max_tokens"),
            ("INVALID_ARGUMENT", "context"),
            ("INVALID_ARGUMENT", "ModelStreamInfer"),  # Triton's stream tensor needs the stream
        ]
        for result, (status, needle) in zip(results, expected, strict=True):
            assert result["error"]["status"] == f"StatusCode.{status}", result
            assert needle in result["error"]["message"], result
        assert s.server.engine.fake.requests == []


def test_stream_is_token_identical_to_generate_stream():
    """Triton's CI request (stream tensor, sampling_parameters tensor, request parameters) over
    ModelStreamInfer: the deltas are generate_stream's, the last one carries the counts."""
    sampling = {"temperature": "0", "max_tokens": "5"}
    tensors = {"stream": True, "sampling_parameters": sampling, "exclude_input_in_output": True,
               "return_num_output_tokens": True}  # fmt: skip
    with served() as s:
        (answers,) = triton_client(s.url, [
            {"op": "stream", "requests": [
                request(["Hello world"], tensors=tensors, request_id="s1", parameters=sampling)]},
        ])  # fmt: skip
        r = s.http(f"/v2/models/{MODEL_NAME}/generate_stream",
                   {"text_input": "Hello world", "parameters": {"temperature": 0, "max_tokens": 5}})  # fmt: skip
        texts = [a["outputs"]["text_output"][0] for a in answers]
        assert texts == [e["text_output"] for e in sse(r.text)] == list("HELLO")
        assert {a["id"] for a in answers} == {"s1"}
        assert [a["outputs"]["num_output_tokens"] for a in answers] == [[1]] * 5
        assert answers[-1]["outputs"]["finish_reason"] == ["length"]
        assert answers[-1]["outputs"]["completion_tokens"] == [5]
        assert "finish_reason" not in answers[0]["outputs"]


def test_stream_carries_requests_side_by_side_and_errors_in_band():
    with served(delay=0.005) as s:
        (answers,) = triton_client(s.url, [
            {"op": "stream", "requests": [
                request(["abcdef"], tensors={"stream": True}, request_id="a", parameters={"max_tokens": 6}),
                request(["xyz"], request_id="b", parameters={"max_tokens": 3}),  # not streamed: one answer
                request(["bad"], tensors={"stream": True}, request_id="c", parameters={"top_p": 7}),
            ]},
        ])  # fmt: skip
        by_id: dict[str, list[str]] = {}
        errors = [a["error"]["message"] for a in answers if "error" in a]
        for a in answers:
            if "error" not in a:
                by_id.setdefault(a["id"], []).append(a["outputs"]["text_output"][0])
        assert by_id == {"a": list("ABCDEF"), "b": ["XYZ"]}
        assert len(errors) == 1 and "top_p" in errors[0]
        assert s.server.admission.in_flight == 0 and s.server.dataplane.online_load == 0


def test_grpc_authenticates_like_http(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("EVLLM_API_KEYS", API_KEY)
    with served() as s:
        refused, answered, ready = triton_client(s.url, [
            {"op": "infer", "request": request(["Hi"])},
            {"op": "infer", "request": request(["Hi"], headers={"authorization": f"Bearer {API_KEY}"})},
            {"op": "ready"},  # readiness stays open, as over HTTP
        ])  # fmt: skip
        assert refused["error"]["status"] == "StatusCode.UNAUTHENTICATED"
        assert answered["outputs"]["text_output"] == ["HI"]
        assert ready is True


# Token-exact on the real engine (the session server serves gRPC beside HTTP) ----------------------------
@pytest.mark.slow
def test_grpc_matches_offline_and_http(server, grpc_url, offline_reference):
    greedy = {"max_tokens": REFERENCE_MAX_TOKENS, "temperature": 0}
    unary, (streamed,) = (
        triton_client(grpc_url, [{"op": "infer", "request": request(REFERENCE_PROMPTS, parameters=greedy)}])[0],
        triton_client(grpc_url, [{"op": "stream", "requests": [
            request([REFERENCE_PROMPTS[1]], tensors={"stream": True}, parameters=greedy, request_id="s")]}]),
    )  # fmt: skip
    assert unary["outputs"]["text_output"] == [ref["text"] for ref in offline_reference]
    assert unary["outputs"]["completion_tokens"] == [len(ref["token_ids"]) for ref in offline_reference]
    assert len(streamed) > 1 and all("error" not in a for a in streamed), streamed
    assert "".join(a["outputs"]["text_output"][0] for a in streamed) == offline_reference[1]["text"]
    assert streamed[-1]["outputs"]["completion_tokens"] == [len(offline_reference[1]["token_ids"])]
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/generate",
                   json={"text_input": REFERENCE_PROMPTS[1], "parameters": {**greedy, "details": True}},
                   timeout=60)  # fmt: skip
    tokens = r.json()["details"]["logprobs"]
    assert [t["id"] for t in tokens] == offline_reference[1]["token_ids"]
    # Real logprobs, one per token (a token's own text may be a partial UTF-8 sequence: "\ufffd").
    assert all(t["logprob"] <= 0 for t in tokens) and len(tokens) == r.json()["completion_tokens"]

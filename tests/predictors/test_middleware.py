"""Middleware shared by every route: a client that goes away aborts its generation in the engine
(streaming and not), online load is counted for background work to back off from, request ids travel
from the client to the engine and back.

In-process over a slow fake engine, which records the requests it saw aborted; one stream disconnect on
the session server shows the real engine stops generating.
"""

from __future__ import annotations

import asyncio
import re
import time
from pathlib import Path

import httpx
import pytest

from eventing.extension import Eventing
from predictors.metrics import protocol_of
from tests import inprocess
from tests.predictors.harness import MODEL_NAME, disconnecting, eventually, samples, total, v2_body

INFERENCE_REQUEST = "dev.evllm.inference.request"
SLOW = 0.05  # seconds per fake token
LONG_PROMPT = "x" * 30  # 30 prompt + 30 generated tokens fit the fake 64-token context: 1.5 s


@pytest.mark.parametrize(
    ("path", "body", "engine_id"),
    [
        (f"/v2/models/{MODEL_NAME}/generate_stream", {"text_input": LONG_PROMPT}, "gone-1"),
        (f"/v2/models/{MODEL_NAME}/generate", {"text_input": LONG_PROMPT}, "gone-1-0"),
        (f"/v2/models/{MODEL_NAME}/infer", v2_body([LONG_PROMPT]), "gone-1-0"),
        (f"/v1/models/{MODEL_NAME}:predict", {"instances": [LONG_PROMPT]}, "gone-1-0-0"),
    ],
)
def test_client_disconnect_aborts_the_generation(path: str, body: dict, engine_id: str):
    async def main() -> None:
        async with inprocess.server(delay=SLOW) as s:
            fake = s.engine.fake
            protocol = protocol_of("POST", path)
            async with s.client() as c:  # the registry is process-wide: compare counts, not totals
                before = samples((await c.get("/metrics")).text)
            start = time.monotonic()
            sent = await disconnecting(
                s.app,
                path,
                {**body, "parameters": {"max_tokens": 30}},
                request_id="gone-1",
                leave_when=lambda: bool(fake.requests) and time.monotonic() - start > 0.1,
            )
            # Aborted in the engine long before its 30 tokens (1.5 s), and nothing completed was sent.
            assert fake.aborted == [engine_id] and fake.requests == [engine_id]
            assert time.monotonic() - start < 1.0
            assert not any(m["type"] == "http.response.body" and not m.get("more_body") for m in sent)
            # The slot and the online count are given back.
            assert s.admission.in_flight == 0 and s.dataplane.online_load == 0
            async with s.client() as c:
                after = samples((await c.get("/metrics")).text)
            assert total(after, "evllm_requests_in_flight", protocol=protocol) == 0

            def counted(code: str) -> float:
                key = {"protocol": protocol, "code": code}
                return total(after, "evllm_requests_total", **key) - total(
                    before, "evllm_requests_total", **key
                )

            # Never counted as a server error: a stream keeps the 200 it sent, a unary request that was
            # never answered counts as 499 (the client's doing).
            assert counted("200" if path.endswith("_stream") else "499") == 1
            assert counted("500") == 0

    asyncio.run(main())


def test_requests_that_complete_are_not_aborted():
    async def main() -> None:
        async with inprocess.server(delay=0.001) as s, s.client() as c:
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate_stream", json={"text_input": "Hello"})
            assert r.status_code == 200
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "Hello"})
            assert r.status_code == 200
            assert len(s.engine.fake.requests) == 2 and s.engine.fake.aborted == []

    asyncio.run(main())


def test_online_load_counts_online_inference_once(tmp_path: Path):
    async def main() -> None:
        argv = ["--storage_roots", str(tmp_path)]
        async with inprocess.server(argv, extensions=[Eventing()], delay=SLOW) as s, s.client() as c:
            dp = s.dataplane
            assert dp.online_load == 0
            online = asyncio.ensure_future(
                c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "a" * 10})
            )
            await eventually(lambda: len(s.engine.fake.requests) == 1)
            assert dp.online_load == 1 and dp.online_changed.is_set()
            await online
            assert dp.online_load == 0
            # The middleware leaves /events alone (batch chunks arrive there and must not slow themselves);
            # an inference event is online work, counted once by its handler.
            headers = {
                "ce-specversion": "1.0",
                "ce-id": "e-1",
                "ce-source": "/t",
                "ce-type": INFERENCE_REQUEST,
            }
            event = asyncio.ensure_future(c.post("/events", json={"text_input": "a" * 10}, headers=headers))
            await eventually(lambda: len(s.engine.fake.requests) == 2)
            assert dp.online_load == 1 and s.admission.in_flight == 1
            assert (await event).status_code == 200
            assert dp.online_load == 0
            # GETs are neither admitted nor online load.
            assert (await c.get(f"/v2/models/{MODEL_NAME}")).status_code == 200
            assert dp.online_load == 0 and s.admission.in_flight == 0

    asyncio.run(main())


def test_request_ids_are_echoed_and_given_to_the_engine():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/generate",
                json={"text_input": "a"},
                headers={"x-request-id": "client-id"},
            )
            assert r.headers["x-request-id"] == "client-id"
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "b"})
            made_up = r.headers["x-request-id"]
            assert re.fullmatch(r"[0-9a-f]{32}", made_up)
            assert s.engine.fake.requests == ["client-id-0", f"{made_up}-0"]
            # Errors and GETs carry one too.
            r = await c.get("/v2/models/nope")
            assert r.status_code == 404 and re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"])

    asyncio.run(main())


# The real engine ------------------------------------------------------------------------------------------
MAX_TOKENS = 900
LONG = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}


def _generated(server) -> float:
    return total(samples(httpx.get(server.url + "/metrics", timeout=30).text), "vllm:generation_tokens_total")


def _settled(server) -> float:
    """The token counter once it stops moving (the engine finished or aborted everything)."""
    last = _generated(server)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _generated(server)
        if now == last:
            return now
        last = now
    raise AssertionError("engine kept generating for 60 s")


@pytest.mark.slow
def test_stream_disconnect_aborts_in_the_real_engine(server):
    before = _settled(server)
    with httpx.stream(
        "POST",
        f"{server.url}/v2/models/{MODEL_NAME}/generate_stream",
        json={"text_input": "Hello", "parameters": LONG},
        timeout=30,
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    generated = _settled(server) - before
    assert 0 < generated < MAX_TOKENS

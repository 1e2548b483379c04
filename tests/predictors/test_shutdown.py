"""Graceful shutdown: on SIGTERM readiness goes false, new work gets 503, work in flight (streams included)
finishes complete, the replica keeps answering at least --drain_seconds and exits 0 within the grace period.

The drain logic in-process (fake uvicorn server, fake engine), then a real SIGTERM to the `restarted`
server, which runs last of all (lifecycle "sigterm") because it stops it.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from predictors.admission import Admission
from predictors.shutdown import GracefulShutdown
from tests import inprocess
from tests.conftest import API_KEY, DRAIN_SECONDS, GRACE_PERIOD, MAX_TOKENS_LIMIT
from tests.predictors.harness import MODEL_NAME, eventually, samples, v2_body


class Uvicorn:
    """uvicorn.Server's signal surface: `handle_exit`, which GracefulShutdown wraps."""

    def __init__(self) -> None:
        self.exits: list[tuple[int, float]] = []

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.exits.append((sig, time.monotonic()))


def _shutdown(admission: Admission, grace: float, drain: float) -> tuple[GracefulShutdown, Uvicorn, Any]:
    engine = SimpleNamespace(draining=False)
    graceful = GracefulShutdown(admission, engine, grace_period=grace, drain_seconds=drain)
    server = Uvicorn()
    graceful.install(server)
    return graceful, server, engine


def test_sigterm_waits_for_work_in_flight_and_at_least_the_drain_time():
    async def main() -> None:
        admission = Admission(limit=4)
        _, server, engine = _shutdown(admission, grace=5.0, drain=0.2)
        admission.acquire()
        sent = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        assert admission.draining and engine.draining
        await asyncio.sleep(0.4)
        assert server.exits == []  # past the drain time, but a request is still in flight
        admission.release()
        await eventually(lambda: bool(server.exits))
        ((sig, at),) = server.exits
        assert sig == signal.SIGTERM and 0.4 <= at - sent < 1.0

        # Nothing in flight: uvicorn is told only once the drain time is over.
        _, server, _ = _shutdown(Admission(limit=4), grace=5.0, drain=0.3)
        sent = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        await eventually(lambda: bool(server.exits))
        assert 0.3 <= server.exits[0][1] - sent < 0.8

    asyncio.run(main())


def test_the_grace_period_bounds_the_wait(caplog: pytest.LogCaptureFixture):
    async def main() -> None:
        admission = Admission(limit=4)
        _, server, _ = _shutdown(admission, grace=0.3, drain=0.1)
        admission.acquire()
        sent = time.monotonic()
        server.handle_exit(signal.SIGTERM, None)
        await eventually(lambda: bool(server.exits))
        assert 0.3 <= server.exits[0][1] - sent < 0.8
        assert admission.in_flight == 1  # stopped anyway

    with caplog.at_level("INFO", logger="evllm.shutdown"):
        asyncio.run(main())
    assert "draining 1 request(s) in flight (grace period 0s)" in caplog.text
    assert "grace period over with 1 request(s) still in flight; stopping anyway" in caplog.text


def test_a_second_signal_stops_at_once():
    async def main() -> None:
        admission = Admission(limit=4)
        _, server, _ = _shutdown(admission, grace=30.0, drain=10.0)
        admission.acquire()
        server.handle_exit(signal.SIGTERM, None)
        await asyncio.sleep(0.05)
        assert server.exits == []
        server.handle_exit(signal.SIGINT, None)
        assert [sig for sig, _ in server.exits] == [signal.SIGINT]

    asyncio.run(main())


def test_a_signal_before_serving_stops_at_once():
    # No event loop yet (the engine is not even built): nothing to drain.
    admission = Admission(limit=4)
    _, server, engine = _shutdown(admission, grace=30.0, drain=10.0)
    server.handle_exit(signal.SIGTERM, None)
    assert [sig for sig, _ in server.exits] == [signal.SIGTERM]
    assert not admission.draining and not engine.draining


def test_a_draining_server_answers_503_but_stays_live():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            graceful = GracefulShutdown(s.admission, s.engine, grace_period=5.0, drain_seconds=0.0)
            graceful.begin()
            assert (await c.get("/v2/health/ready")).status_code == 503
            assert (await c.get(f"/v2/models/{MODEL_NAME}/ready")).status_code == 503
            assert (await c.get("/v2/health/live")).status_code == 200
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["late"]))
            assert r.status_code == 503 and r.json() == {
                "error": "Server is shutting down, retry on another replica."
            }
            assert samples((await c.get("/metrics")).text)[f'evllm_draining{{model="{MODEL_NAME}"}}'] == 1
            assert s.engine.fake.requests == []

    asyncio.run(main())


# The real server ------------------------------------------------------------------------------------------
AUTH = {"Authorization": f"Bearer {API_KEY}"}
BATCH = 64  # prompts per V2 request (the default --max_prompts_per_request)
LOADS = 3  # V2 requests of BATCH prompts, so the streams below share the engine with ~200 sequences
STREAMS = 2
EVERYTHING = {"max_tokens": MAX_TOKENS_LIMIT, "ignore_eos": True, "temperature": 0}


def _stream(url: str, started: threading.Event, result: dict[str, Any]) -> None:
    body = {"text_input": "Once upon a time", "parameters": EVERYTHING}
    try:
        with httpx.stream("POST", url, json=body, headers=AUTH, timeout=120) as r:
            result["status"] = r.status_code
            chunks = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                    started.set()
            result["chunks"] = chunks
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    finally:
        started.set()


def _infer(url: str, i: int, result: dict[str, Any]) -> None:
    prompts = [f"Request {i} prompt {j}" for j in range(BATCH)]
    try:
        r = httpx.post(url, json=v2_body(prompts, EVERYTHING), headers=AUTH, timeout=120)
        result["status"] = r.status_code
        result["body"] = r.json()
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)


def _admitted(base: str) -> float:
    text = httpx.get(base + "/metrics", timeout=10).text
    return samples(text).get(f'evllm_admitted_requests{{model="{MODEL_NAME}"}}', 0.0)


def _log(path: Path) -> str:
    return path.read_text(errors="replace")


@pytest.mark.slow
@pytest.mark.lifecycle("sigterm")
def test_sigterm_finishes_work_in_flight_refuses_new_work_and_exits_0(restarted):
    base = restarted.url
    streams = [{} for _ in range(STREAMS)]
    loads = [{} for _ in range(LOADS)]
    started = [threading.Event() for _ in range(STREAMS)]
    threads = [
        threading.Thread(target=_infer, args=(f"{base}/v2/models/{MODEL_NAME}/infer", i, loads[i]))
        for i in range(LOADS)
    ]
    threads += [
        threading.Thread(
            target=_stream, args=(f"{base}/v2/models/{MODEL_NAME}/generate_stream", started[i], streams[i])
        )
        for i in range(STREAMS)
    ]
    # The loads first, each holding an admission slot (or done) before the streams start: a load still on
    # its way when SIGTERM lands would rightly be refused as new work.
    for t in threads[:LOADS]:
        t.start()
    deadline = time.monotonic() + 60
    while (running := sum(t.is_alive() for t in threads[:LOADS])) and _admitted(base) < running:
        assert time.monotonic() < deadline, loads
        time.sleep(0.02)
    for t in threads[LOADS:]:
        t.start()
    for s in started:
        assert s.wait(60)
    assert all("error" not in s and s.get("status") == 200 for s in streams), streams
    sent = time.monotonic()
    restarted.proc.send_signal(signal.SIGTERM)
    # Draining: not ready, new work refused with a JSON 503 (retried elsewhere), liveness still fine.
    deadline = time.monotonic() + 5
    while httpx.get(base + "/v2/health/ready", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "readiness still true after SIGTERM"
        time.sleep(0.05)
    r = httpx.post(
        f"{base}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": "late", "parameters": {"max_tokens": 2}},
        headers=AUTH,
        timeout=10,
    )
    assert r.status_code == 503 and "shutting down" in r.json()["error"]
    assert httpx.get(base + "/v2/health/live", timeout=10).status_code == 200
    assert f'evllm_draining{{model="{MODEL_NAME}"}} 1.0' in httpx.get(base + "/metrics", timeout=10).text
    for t in threads:
        t.join(GRACE_PERIOD + 30)
    # None of the work in flight was lost or cut short.
    for res in streams:
        assert res.get("status") == 200 and "error" not in res, res
        assert not any("error" in c for c in res["chunks"])
        last = res["chunks"][-1]
        assert last["finish_reason"] == "length" and last["completion_tokens"] == MAX_TOKENS_LIMIT, last
    for res in loads:
        assert res.get("status") == 200 and "error" not in res, {k: str(v)[:300] for k, v in res.items()}
        outputs = {o["name"]: o["data"] for o in res["body"]["outputs"]}
        assert outputs["completion_tokens"] == [MAX_TOKENS_LIMIT] * BATCH
    code = restarted.proc.wait(GRACE_PERIOD + 30)
    elapsed = time.monotonic() - sent
    assert code == 0, restarted.tail()
    # It kept answering for --drain_seconds (endpoints update meanwhile), and stopped within the grace period.
    assert DRAIN_SECONDS <= elapsed < GRACE_PERIOD + 20, elapsed
    log = _log(restarted.log_path)
    drained = re.search(r"SIGTERM: draining (\d+) request\(s\) in flight", log)
    assert drained and int(drained.group(1)) >= STREAMS, restarted.tail()
    assert "drained: no request in flight" in log

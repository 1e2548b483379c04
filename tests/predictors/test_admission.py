"""Overload: a bounded number of requests per replica; past it 429 + Retry-After at once, never a queue."""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from predictors import metrics
from predictors.admission import Admission
from predictors.errors import NotReady, Overloaded, install_handlers
from predictors.middleware import Admit
from tests.conftest import MODEL_NAME
from tests.predictors.conftest import ADMISSION_LIMIT, RETRY_AFTER


def test_admission_counts_and_refuses():
    adm = Admission(limit=2, retry_after=3)
    adm.acquire()
    with adm.admit():
        assert adm.in_flight == 2
        with pytest.raises(Overloaded) as exc:
            adm.acquire()
        assert exc.value.status == 429 and exc.value.headers == {"Retry-After": "3"}
    adm.release()
    assert adm.in_flight == 0
    adm.draining = True
    with pytest.raises(NotReady):
        adm.acquire()
    with pytest.raises(ValueError):
        Admission(limit=0)


def test_wait_idle_returns_when_the_last_request_ends():
    asyncio.run(_wait_idle())


async def _wait_idle() -> None:
    adm = Admission(limit=4)
    adm.acquire()
    waiter = asyncio.ensure_future(adm.wait_idle())
    await asyncio.sleep(0.05)
    assert not waiter.done()
    adm.release()
    await asyncio.wait_for(waiter, 1)


def _app(adm: Admission, gate: asyncio.Event) -> FastAPI:
    app = FastAPI()
    install_handlers(app)

    @app.post("/work")
    async def work(request: Request) -> JSONResponse:
        await gate.wait()
        return JSONResponse({"ok": True})

    @app.get("/info")
    async def info() -> JSONResponse:
        return JSONResponse({"ok": True})

    app.add_middleware(Admit, admission=adm)
    return app


def test_middleware_429_past_the_limit_and_get_is_not_admitted():
    asyncio.run(_middleware_429())


async def _middleware_429() -> None:
    metrics.init("unit", 1)
    adm = Admission(limit=1, retry_after=5)
    gate = asyncio.Event()
    transport = httpx.ASGITransport(app=_app(adm, gate))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        first = asyncio.ensure_future(client.post("/work"))
        while adm.in_flight == 0:
            await asyncio.sleep(0.01)
        second = await client.post("/work")
        assert second.status_code == 429
        assert second.headers["retry-after"] == "5"
        assert "limit of 1" in second.json()["error"]
        assert (await client.get("/info")).status_code == 200
        assert (await client.post("/v2/repository/models/m/unload")).status_code == 404
        r = await client.post("/v2/models/m/versions/7/infer")
        assert r.status_code == 404 and "versions are not supported" in r.json()["error"]
        assert (await client.get("/v2/models/m?model_version=2")).status_code == 404
        gate.set()
        assert (await first).status_code == 200
        assert adm.in_flight == 0
        adm.draining = True
        r = await client.post("/work")
        assert r.status_code == 503 and "shutting down" in r.json()["error"]


# Against the hardened server (admission limit 2) -----------------------------------------------------
def _stream(url: str, headers: dict[str, str], started: threading.Event, out: list) -> None:
    body = {"text_input": "Hello", "parameters": {"max_tokens": 200, "ignore_eos": True}}
    with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if line.startswith("data: "):
                started.set()
                out.append(json.loads(line[6:]))


@pytest.mark.slow
def test_overload_is_429_with_retry_after_and_never_5xx(hardened):
    url = f"{hardened.url}/v2/models/{MODEL_NAME}/generate_stream"
    outs: list[list] = [[] for _ in range(ADMISSION_LIMIT)]
    events = [threading.Event() for _ in range(ADMISSION_LIMIT)]
    threads = [
        threading.Thread(target=_stream, args=(url, hardened.headers, events[i], outs[i]))
        for i in range(ADMISSION_LIMIT)
    ]
    for t in threads:
        t.start()
    for e in events:
        assert e.wait(60)
    # Every slot is held by a stream: the next request is refused at once, not queued.
    r = httpx.post(
        f"{hardened.url}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": "Hi", "parameters": {"max_tokens": 2}},
        headers=hardened.headers,
        timeout=10,
    )
    assert r.status_code == 429, r.text
    assert r.headers["retry-after"] == str(RETRY_AFTER)
    assert "retry later" in r.json()["error"]
    # Health and metadata are not admission-controlled.
    assert httpx.get(hardened.url + "/v2/health/ready", timeout=10).status_code == 200
    for t in threads:
        t.join(120)
    for out in outs:
        assert out[-1]["finish_reason"] == "length" and out[-1]["completion_tokens"] == 200

    # A burst: each request is either served or refused with 429; nothing else.
    def one(i: int) -> int:
        return httpx.post(
            f"{hardened.url}/v2/models/{MODEL_NAME}/generate",
            json={"text_input": f"Burst {i}", "parameters": {"max_tokens": 8}},
            headers=hardened.headers,
            timeout=60,
        ).status_code

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        codes = list(pool.map(one, range(24)))
    assert set(codes) <= {200, 429} and 200 in codes and 429 in codes, codes
    text = httpx.get(hardened.url + "/metrics", timeout=10).text
    assert f'evllm_admission_limit{{model="{MODEL_NAME}"}} {float(ADMISSION_LIMIT)}' in text
    rejected = [
        line
        for line in text.splitlines()
        if line.startswith("evllm_requests_rejected_total") and 'reason="overloaded"' in line
    ]
    assert rejected and float(rejected[0].split()[-1]) >= 1 + codes.count(429)

"""Overload: a bounded number of requests per replica; past it 429 + Retry-After at once, never a queue.

The Admission object, then the assembled server in-process over a slow fake engine (--max_concurrent_
requests 2, --retry_after_seconds 2).
"""

from __future__ import annotations

import asyncio

import pytest

from predictors.admission import Admission
from predictors.errors import NotReady, Overloaded
from tests import inprocess
from tests.predictors.harness import MODEL_NAME, eventually, samples, scrape, sse, total, v2_body

ADMISSION_LIMIT = 2
RETRY_AFTER = 2
ADMISSION = ["--max_concurrent_requests", str(ADMISSION_LIMIT), "--retry_after_seconds", str(RETRY_AFTER)]


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
    async def main() -> None:
        adm = Admission(limit=4)
        await asyncio.wait_for(adm.wait_idle(), 1)  # idle already
        adm.acquire()
        adm.acquire()
        waiter = asyncio.ensure_future(adm.wait_idle())
        await asyncio.sleep(0.05)
        adm.release()
        await asyncio.sleep(0.05)
        assert not waiter.done()
        adm.release()
        await asyncio.wait_for(waiter, 1)

    asyncio.run(main())


def test_overload_is_429_with_retry_after_and_never_a_queue():
    async def main() -> None:
        # 0.02 s per token: a 20-token stream holds its slot for ~0.4 s.
        async with inprocess.server(ADMISSION, delay=0.02) as s, s.client() as c:
            before = await scrape(c)
            body = {"text_input": "a" * 30, "parameters": {"max_tokens": 20}}
            streams = [
                asyncio.ensure_future(c.post(f"/v2/models/{MODEL_NAME}/generate_stream", json=body))
                for _ in range(ADMISSION_LIMIT)
            ]
            await eventually(lambda: s.admission.in_flight == ADMISSION_LIMIT)
            # Every slot is held by a stream: the next request is refused at once, not queued.
            r = await asyncio.wait_for(
                c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "Hi"}), timeout=0.2
            )
            assert r.status_code == 429, r.text
            assert r.headers["retry-after"] == str(RETRY_AFTER)
            assert r.json() == {"error": "Server is at its limit of 2 concurrent requests, retry later."}
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["Hi"]))
            assert r.status_code == 429
            # Health, metadata and metrics are not admission-controlled.
            assert (await c.get("/v2/health/ready")).status_code == 200
            assert (await c.get(f"/v2/models/{MODEL_NAME}")).status_code == 200
            mid = await scrape(c)
            assert total(mid, "evllm_admitted_requests") == ADMISSION_LIMIT
            for out in await asyncio.gather(*streams):
                assert out.status_code == 200
                last = sse(out.text)[-1]
                assert last["finish_reason"] == "length" and last["completion_tokens"] == 20
            assert s.admission.in_flight == 0
            # Two refusals never reached the engine.
            assert len(s.engine.fake.requests) == ADMISSION_LIMIT
            after = await scrape(c)
            assert total(after, "evllm_admission_limit", model=MODEL_NAME) == ADMISSION_LIMIT
            assert total(after, "evllm_admitted_requests", model=MODEL_NAME) == 0
            rejected = total(after, "evllm_requests_rejected_total", reason="overloaded") - total(
                before, "evllm_requests_rejected_total", reason="overloaded"
            )
            assert rejected == 2
            code_429 = total(after, "evllm_requests_total", code="429") - total(
                before, "evllm_requests_total", code="429"
            )
            assert code_429 == 2

    asyncio.run(main())


def test_a_burst_is_served_or_refused_with_429_and_nothing_else():
    async def main() -> None:
        async with inprocess.server(ADMISSION, delay=0.005) as s, s.client() as c:
            before = await scrape(c)

            async def one(i: int) -> int:
                r = await c.post(
                    f"/v2/models/{MODEL_NAME}/generate",
                    json={"text_input": f"Burst {i}", "parameters": {"max_tokens": 8}},
                )
                if r.status_code == 200:
                    assert r.json()["text_output"] == f"BURST {i}"[:8]
                return r.status_code

            codes = await asyncio.gather(*(one(i) for i in range(24)))
            assert set(codes) == {200, 429}, codes
            assert len(s.engine.fake.requests) == codes.count(200)
            after = samples((await c.get("/metrics")).text)
            rejected = total(after, "evllm_requests_rejected_total", reason="overloaded") - total(
                before, "evllm_requests_rejected_total", reason="overloaded"
            )
            assert rejected == codes.count(429)
            assert s.admission.in_flight == 0

    asyncio.run(main())


def test_get_is_not_admitted_and_kserve_routes_we_do_not_offer_are_404():
    async def main() -> None:
        async with inprocess.server(["--max_concurrent_requests", "1"], delay=0.02) as s, s.client() as c:
            held = asyncio.ensure_future(
                c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "a" * 10})
            )
            await eventually(lambda: s.admission.in_flight == 1)
            assert (await c.get(f"/v2/models/{MODEL_NAME}")).status_code == 200
            assert (await c.get("/v2")).status_code == 200
            # KServe would unload our only model, or answer 501 for versions: 404 here, even when full (version 1,
            # the model's one version, is served: test_conformance).
            for method, path in (
                ("POST", f"/v2/repository/models/{MODEL_NAME}/unload"),
                ("POST", f"/v2/repository/models/{MODEL_NAME}/load"),
                ("POST", "/v2/repository/index"),
                ("POST", f"/v2/models/{MODEL_NAME}/versions/7/infer"),
                ("GET", f"/v2/models/{MODEL_NAME}/versions/7"),
                ("GET", f"/v2/models/{MODEL_NAME}/versions/7/ready"),
                ("GET", f"/v2/models/{MODEL_NAME}?model_version=2"),
                ("POST", f"/v2/models/{MODEL_NAME}/infer?model_version=2"),
            ):
                r = await c.request(method, path, json={})
                assert r.status_code == 404, (method, path, r.status_code, r.text)
                assert "disabled" in r.json()["error"] or "serves version 1" in r.json()["error"]
            assert (await held).status_code == 200
            # The model is still there and serving.
            assert (await c.get(f"/v2/models/{MODEL_NAME}/ready")).status_code == 200
            assert (await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["ok"]))).status_code == 200

    asyncio.run(main())


def test_draining_refuses_new_work_with_503():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            s.admission.draining = True
            for path, body in (
                (f"/v2/models/{MODEL_NAME}/generate", {"text_input": "late"}),
                (f"/v2/models/{MODEL_NAME}/infer", v2_body(["late"])),
                ("/openai/v1/completions", {"prompt": "late"}),
            ):
                r = await c.post(path, json=body)
                assert r.status_code == 503 and "shutting down" in r.json()["error"], (path, r.text)
            assert s.engine.fake.requests == [] and s.openai.calls == []
            assert (await c.get("/v2/health/live")).status_code == 200

    asyncio.run(main())

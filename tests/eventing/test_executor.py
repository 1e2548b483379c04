"""The batch executor's adaptive in-flight limit (no engine)."""

from __future__ import annotations

import asyncio
import time

import pytest

from eventing.batch import Line
from eventing.executor import AdaptiveLimit, Executor
from predictors.errors import InvalidInput, NotReady, Overloaded

from .fakes import FakeDataPlane


def test_limit_is_low_under_online_load_and_ramps_up_when_idle() -> None:
    now = [100.0]
    load = [0]
    limit = AdaptiveLimit(lambda: load[0], low=4, high=256, ramp_interval=0.25, clock=lambda: now[0])
    assert limit.current() == 256  # idle since start: full throughput
    load[0] = 2
    assert limit.current() == 4
    now[0] += 10
    assert limit.current() == 4  # as long as online work runs
    load[0] = 0
    assert limit.current() == 4  # just went idle: ramp, do not jump
    now[0] += 0.25
    assert limit.current() == 8
    now[0] += 0.5
    assert limit.current() == 32
    now[0] += 10
    assert limit.current() == 256


def lines(n: int) -> list[Line]:
    return [Line(i, f"c{i}", "/v1/completions", {"prompt": f"p{i}"}) for i in range(n)]


def test_executor_backs_off_while_online_requests_run() -> None:
    async def main() -> None:
        dp = FakeDataPlane(delay=0.02)
        ex = Executor(dp, low=2, high=64, ramp_interval=0.05)
        # Idle engine: the whole chunk goes in at once (up to high).
        await ex.run_lines("k", lines(40))
        assert dp.peak == 40
        dp.peak = 0
        with dp.online():
            await asyncio.sleep(0)
            await ex.run_lines("k", lines(20))
        assert dp.peak <= 2
        await ex.close()

    asyncio.run(main())


def test_online_arrival_lowers_the_limit_for_lines_not_started_yet() -> None:
    async def main() -> None:
        dp = FakeDataPlane(delay=0.05)
        ex = Executor(dp, low=1, high=8, ramp_interval=10)
        task = asyncio.ensure_future(ex.run_lines("k", lines(40)))
        await asyncio.sleep(0.01)
        assert dp.inflight == 8
        with dp.online():
            await asyncio.sleep(0.2)  # the first 8 finish; from then on one at a time
            assert dp.inflight <= 1
        records = await task
        assert [r["custom_id"] for r in records] == [f"c{i}" for i in range(40)]
        assert all(r["response"]["status_code"] == 200 for r in records)
        await ex.close()

    asyncio.run(main())


def line_count(outcome: str) -> float:
    from prometheus_client import REGISTRY

    from predictors import metrics

    value = REGISTRY.get_sample_value(
        "evllm_batch_lines_total", {"model": metrics.model(), "outcome": outcome}
    )
    return value or 0.0


def test_line_errors_become_error_records_and_every_line_is_counted() -> None:
    async def main() -> None:
        before = {o: line_count(o) for o in ("succeeded", "failed")}
        ex = Executor(FakeDataPlane(), low=1, high=4)
        bad = Line(0, "a", error="url must be ...")
        rejected = Line(1, "b", "/v1/completions", {"prompt": "bad"})
        good = Line(2, "c", "/v1/completions", {"prompt": "fine"})
        records = await ex.run_lines("k", [bad, rejected, good])
        assert records[0]["error"]["code"] == "invalid_request" and records[0]["response"] is None
        assert records[1]["error"]["code"] == "http_400" and records[1]["response"]["status_code"] == 400
        assert records[1]["error"]["message"] == "max_tokens must be at least 1"  # the OpenAI layer's
        assert records[2]["error"] is None and records[2]["response"]["body"]["choices"][0]["text"] == "FINE"
        assert line_count("failed") - before["failed"] == 2
        assert line_count("succeeded") - before["succeeded"] == 1
        await ex.close()

    asyncio.run(main())


def test_unexpected_line_exception_is_that_lines_error_unless_the_engine_is_down() -> None:
    async def main() -> None:
        dp = FakeDataPlane()

        async def boom(url, body, *, priority=0):
            if body["prompt"] == "a":
                raise InvalidInput("prompt has 99 tokens; the limit is 48")
            raise RuntimeError("oops")

        dp.openai_call = boom  # type: ignore[method-assign]
        ex = Executor(dp, low=1, high=4)
        a, b = await ex.run_lines("k", [Line(0, "a", "/v1/completions", {"prompt": "a"}),
                                        Line(1, "b", "/v1/completions", {"prompt": "b"})])  # fmt: skip
        assert (a["error"]["code"], a["response"]["status_code"]) == ("InvalidInput", 400)
        assert a["error"]["message"] == "prompt has 99 tokens; the limit is 48"
        assert (b["error"]["code"], b["response"]["status_code"]) == ("internal_error", 500)
        # The same failure while the engine is away is the engine's, not the line's: the chunk is retried.
        dp.ready = False
        with pytest.raises(NotReady):
            await ex.run_lines("k", [Line(0, "b", "/v1/completions", {"prompt": "b"})])
        assert ex.inflight == 0
        await ex.close()

    asyncio.run(main())


@pytest.mark.parametrize(("status", "error"), [(503, NotReady), (429, Overloaded)])
def test_retryable_openai_answers_fail_the_chunk_not_the_line(status: int, error: type) -> None:
    async def main() -> None:
        dp = FakeDataPlane()

        async def busy(url, body, *, priority=0):
            return status, {"error": {"message": "try again", "type": "x", "code": status}}

        dp.openai_call = busy  # type: ignore[method-assign]
        ex = Executor(dp, low=1, high=4)
        with pytest.raises(error, match="try again"):
            await ex.run_lines("k", [Line(0, "a", "/v1/completions", {"prompt": "a"})])
        assert ex.inflight == 0
        await ex.close()

    asyncio.run(main())


def test_chunk_stops_feeding_lines_once_the_engine_went_away() -> None:
    async def main() -> None:
        dp = FakeDataPlane()
        calls = 0

        async def flaky(url, body, *, priority=0):
            nonlocal calls
            calls += 1
            await asyncio.sleep(0.001)
            if calls >= 3:
                raise NotReady("engine is not ready")
            return 200, {"choices": []}

        dp.openai_call = flaky  # type: ignore[method-assign]
        ex = Executor(dp, low=2, high=2)
        lines = [Line(i, f"id-{i}", "/v1/completions", {"prompt": "x"}) for i in range(100)]
        with pytest.raises(NotReady):
            await ex.run_lines("k", lines)
        assert calls < 10  # not the other 90-odd lines after the failure
        assert ex.inflight == 0  # every slot given back
        await ex.close()

    asyncio.run(main())


def test_inflight_gauges_follow_the_executor() -> None:
    from prometheus_client import REGISTRY

    from predictors import metrics

    def gauge(name: str) -> float | None:
        return REGISTRY.get_sample_value(name, {"model": metrics.model()})

    async def main() -> None:
        dp = FakeDataPlane(delay=0.05)
        ex = Executor(dp, low=2, high=8, ramp_interval=10)
        seen: list[tuple[float | None, float | None]] = []

        async def watch() -> None:
            for _ in range(5):
                await asyncio.sleep(0.02)
                seen.append((gauge("evllm_batch_inflight"), gauge("evllm_batch_inflight_limit")))

        with dp.online():
            await asyncio.gather(ex.run_lines("k", lines(6)), watch())
        assert (2.0, 2.0) in seen  # two lines in the engine, limit 2 under online load
        assert gauge("evllm_batch_inflight") == 0
        await ex.close()

    asyncio.run(main())


def test_cancel_aborts_lines_even_when_the_serving_layer_answers_instead() -> None:
    """vLLM's serving classes catch the cancellation and answer "Client disconnected" (the engine aborts
    the request all the same): those lines are cancelled, not failed with that answer."""
    from eventing.cancel import CancelToken

    async def main() -> None:
        dp = FakeDataPlane()
        started = asyncio.Event()

        async def swallowing(url, body, *, priority=0):
            started.set()
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                return 400, {
                    "error": {"message": "Client disconnected", "type": "BadRequestError", "code": 400}
                }
            return 200, {"choices": []}

        dp.openai_call = swallowing  # type: ignore[method-assign]
        ex = Executor(dp, low=2, high=2)
        token = CancelToken()
        run = asyncio.ensure_future(ex.run_lines("k", lines(5), token))
        await started.wait()
        token.fire(time.time())
        records = await asyncio.wait_for(run, 2)
        assert [r["error"]["code"] for r in records] == ["cancelled"] * 5
        assert ex.inflight == 0
        await ex.close()

    asyncio.run(main())

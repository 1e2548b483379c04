"""Fair sharing between jobs: the executor hands slots round-robin between jobs, so a small job started
while a huge one holds many chunks on this replica (sink mode: many batch.chunk deliveries at once) gets
half the engine, not one share in (chunks + 1)."""

from __future__ import annotations

import asyncio
from typing import Any

from eventing.batch import Line
from eventing.executor import Executor

from .fakes import FakeDataPlane


class Recording(FakeDataPlane):
    """Records the order in which lines start (by prompt)."""

    def __init__(self, delay: float) -> None:
        super().__init__(delay=delay)
        self.started: list[str] = []

    async def openai_call(self, url: str, body: Any, *, priority: int = 0) -> tuple[int, dict[str, Any]]:
        self.started.append(body["prompt"])
        return await super().openai_call(url, body, priority=priority)


def lines(job: str, n: int) -> list[Line]:
    return [Line(i, f"{job}-{i}", "/v1/completions", {"prompt": f"{job}-{i}"}) for i in range(n)]


def test_a_small_job_gets_an_equal_share_beside_a_huge_one() -> None:
    async def main() -> None:
        dp = Recording(delay=0.002)
        ex = Executor(dp, low=4, high=4)
        # The huge job: 16 chunks of 16 lines delivered at once; the small job arrives once they run.
        huge = [asyncio.ensure_future(ex.run_lines("huge", lines(f"h{c}", 16))) for c in range(16)]
        await asyncio.sleep(0.01)
        small = await ex.run_lines("small", lines("s", 16))
        assert all(r["error"] is None for r in small)
        await asyncio.gather(*huge)
        await ex.close()
        # While the small job ran, the huge job started about as many lines as it did (round-robin), not
        # 16 times as many (first come, first served between the 17 chunk feeders).
        first = dp.started.index("s-0")
        last = dp.started.index("s-15")
        huge_between = sum(1 for p in dp.started[first:last] if p.startswith("h"))
        assert huge_between <= 16 + 4, dp.started[first:last]
        assert ex.inflight == 0

    asyncio.run(main())


def test_round_robin_between_three_jobs_keeps_each_job_in_order() -> None:
    async def main() -> None:
        dp = Recording(delay=0.001)
        ex = Executor(dp, low=1, high=1)
        results = await asyncio.gather(*(ex.run_lines(job, lines(job, 6)) for job in ("x", "y", "z")))
        await ex.close()
        assert all(r["error"] is None for rs in results for r in rs)
        # One slot: after the first grant the jobs take turns, each job's own lines in order.
        turns = [p[0] for p in dp.started[3:15]]
        assert all(turns[i] != turns[i + 1] for i in range(len(turns) - 1)), dp.started
        for job in "xyz":
            own = [p for p in dp.started if p[0] == job]
            assert own == [f"{job}-{i}" for i in range(6)]

    asyncio.run(main())

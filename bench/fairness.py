"""Two jobs at once on one replica, engine-free (`python -m bench.fairness`): how long a small job takes
while a huge job holds many chunks here (sink mode: Knative delivers many batch.chunk events at once),
against the small job alone. Slots go round-robin between jobs (eventing.executor); the same run with
every line in one queue (first come, first served) shows what that replaces.

The engine is a stand-in with a fixed time per line, so the figure is about scheduling, not speed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import time
from collections.abc import Iterator
from typing import Any

from eventing.batch import Line
from eventing.executor import Executor


class FixedTimeEngine:
    """eventing.dataplane.DataPlaneView with ``seconds`` per line and no online traffic."""

    model_name = "bench"

    def __init__(self, seconds: float):
        self.seconds = seconds
        self.online_changed = asyncio.Event()
        self.ready = True
        self.online_load = 0

    @contextlib.contextmanager
    def online(self) -> Iterator[None]:
        yield

    async def generate(self, *args: Any, **kwargs: Any) -> Any:
        raise NotImplementedError

    async def openai_call(self, url: str, body: Any, *, priority: int = 0) -> tuple[int, dict[str, Any]]:
        await asyncio.sleep(self.seconds)
        return 200, {"choices": [{"text": "x"}]}


def _lines(prefix: str, n: int) -> list[Line]:
    return [Line(i, f"{prefix}-{i}", "/v1/completions", {"prompt": "x"}) for i in range(n)]


async def small_job_seconds(
    *, small: int, huge_chunks: int, chunk: int, slots: int, seconds: float, shared_queue: bool
) -> float:
    """Seconds for the small job's chunk; ``huge_chunks == 0``: alone. ``shared_queue``: both jobs'
    lines in one queue (first come, first served), as before round-robin."""
    ex = Executor(FixedTimeEngine(seconds), low=slots, high=slots)  # type: ignore[arg-type]
    huge = [asyncio.ensure_future(ex.run_lines("huge", _lines(f"h{c}", chunk))) for c in range(huge_chunks)]
    await asyncio.sleep(seconds)  # the huge job is running when the small one arrives
    t0 = time.perf_counter()
    await ex.run_lines("huge" if shared_queue else "small", _lines("s", small))
    elapsed = time.perf_counter() - t0
    for task in huge:
        task.cancel()
    await asyncio.gather(*huge, return_exceptions=True)
    await ex.close()
    return elapsed


def measure(
    small: int = 64, huge_chunks: int = 32, chunk: int = 64, slots: int = 8, seconds: float = 0.01
) -> dict[str, Any]:
    kw = {"small": small, "chunk": chunk, "slots": slots, "seconds": seconds}
    alone = asyncio.run(small_job_seconds(huge_chunks=0, shared_queue=False, **kw))
    fair = asyncio.run(small_job_seconds(huge_chunks=huge_chunks, shared_queue=False, **kw))
    fifo = asyncio.run(small_job_seconds(huge_chunks=huge_chunks, shared_queue=True, **kw))
    return {
        "small_lines": small,
        "huge_lines_in_flight_chunks": huge_chunks * chunk,
        "slots": slots,
        "line_seconds": seconds,
        "small_alone_s": alone,
        "small_beside_huge_round_robin_s": fair,
        "small_beside_huge_one_queue_s": fifo,
        "round_robin_ratio": fair / alone,
        "one_queue_ratio": fifo / alone,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.fairness", description=__doc__)
    p.add_argument("--small", type=int, default=64, help="lines of the small job (one chunk)")
    p.add_argument("--huge-chunks", type=int, default=32, help="chunks of the huge job running here at once")
    p.add_argument("--chunk", type=int, default=64, help="lines per chunk of the huge job")
    p.add_argument("--slots", type=int, default=8, help="batch lines in flight (--batch_max_inflight)")
    p.add_argument("--line-seconds", type=float, default=0.01, help="engine time per line")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.small, a.huge_chunks, a.chunk, a.slots, a.line_seconds), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

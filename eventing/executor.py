"""Runs batch lines on the shared engine below online traffic, with an adaptive in-flight limit.

Engine priority alone does not protect online latency (measured: 128 batch sequences in flight at
priority 10 took online p95 from 52 ms to 5.2 s, the same as FCFS; 1 or 2 in flight cost x1.1). So:

* while any online request runs or waits on this replica (``DataPlane.online_load > 0``) at most
  ``low`` batch sequences are in flight (new lines wait; running ones finish);
* once online traffic stops, the limit doubles every ``ramp_interval`` seconds up to ``high``, so a
  short gap between online requests does not flood the engine, and an idle engine reaches full
  batch throughput within a second or two.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from predictors import metrics as server_metrics
from predictors.errors import EvllmError, NotReady, Overloaded, from_openai

from . import metrics
from .batch import Line, error_record, success_record
from .config import BATCH_PRIORITY
from .dataplane import DataPlaneView


class AdaptiveLimit:
    """How many batch sequences may be in flight now, given the online load."""

    def __init__(
        self,
        load: Callable[[], int],
        *,
        low: int,
        high: int,
        ramp_interval: float = 0.25,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.load, self.low, self.high = load, max(1, low), max(1, low, high)
        self.ramp_interval, self.clock = ramp_interval, clock
        self._idle_since: float | None = float("-inf")  # start idle: full speed

    def observe(self) -> None:
        """Record an online-load change (called whenever ``online_changed`` fires)."""
        if self.load() > 0:
            self._idle_since = None
        elif self._idle_since is None:
            self._idle_since = self.clock()

    def current(self) -> int:
        self.observe()
        if self._idle_since is None:
            return self.low
        idle = self.clock() - self._idle_since
        steps = int(idle / self.ramp_interval) if idle != float("inf") else 64
        return int(min(self.high, self.low * 2 ** min(steps, 32)))


class Executor:
    """One per process: every chunk of every job shares the same in-flight budget."""

    def __init__(
        self,
        dataplane: DataPlaneView,
        *,
        low: int,
        high: int,
        ramp_interval: float = 0.25,
    ):
        self.dataplane = dataplane
        self.limit = AdaptiveLimit(
            lambda: dataplane.online_load, low=low, high=high, ramp_interval=ramp_interval
        )
        self.inflight = 0
        self._cond: asyncio.Condition | None = None
        self._watcher: asyncio.Task[None] | None = None

    def _condition(self) -> asyncio.Condition:
        if self._cond is None:
            self._cond = asyncio.Condition()
            self._watcher = asyncio.ensure_future(self._watch())
        return self._cond

    async def _watch(self) -> None:
        """Wake waiting lines whenever online load changes (it can lower or raise the limit)."""
        event = self.dataplane.online_changed
        while True:
            await event.wait()
            event.clear()
            self.limit.observe()
            metrics.inflight(self.inflight, self.limit.current())
            assert self._cond is not None
            async with self._cond:
                self._cond.notify_all()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    async def _acquire(self) -> None:
        cond = self._condition()
        async with cond:
            while self.inflight >= self.limit.current():
                # Timeout: the limit also rises with time (ramp-up) without any event firing.
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(cond.wait(), self.limit.ramp_interval)
            self.inflight += 1
            metrics.inflight(self.inflight, self.limit.current())

    async def _release(self) -> None:
        cond = self._condition()
        async with cond:
            self.inflight -= 1
            metrics.inflight(self.inflight, self.limit.current())
            # One slot freed, one waiter woken: the waiters are chunk feeders, not every pending line.
            cond.notify(1)

    @contextlib.asynccontextmanager
    async def slot(self) -> AsyncIterator[None]:
        await self._acquire()
        try:
            yield
        finally:
            await self._release()

    async def run_line(self, key: str, line: Line) -> dict[str, Any]:
        """One line -> its output record. Engine-not-ready propagates (the chunk is retried whole)."""
        if line.error is not None:
            metrics.line("failed")
            return error_record(key, line, line.error, "invalid_request")
        async with self.slot():
            return await self._call(key, line)

    async def _call(self, key: str, line: Line) -> dict[str, Any]:
        assert line.url is not None and line.body is not None
        token = server_metrics.PROTOCOL.set(metrics.BATCH_PROTOCOL)
        try:
            status, body = await self.dataplane.openai_call(line.url, line.body, priority=BATCH_PRIORITY)
        except (NotReady, Overloaded):
            raise  # not the line's fault: the whole chunk is retried
        except EvllmError as exc:
            metrics.line("failed")
            return error_record(key, line, exc.message, type(exc).__name__, int(exc.status))
        except Exception as exc:
            # One poison line must not fail its chunk forever (redelivered until the dead-letter
            # sink, job never completes): unless the engine itself is down, it is that line's error.
            if not self.dataplane.ready:
                raise NotReady("engine is not ready") from exc
            metrics.line("failed")
            return error_record(key, line, str(exc) or type(exc).__name__, "internal_error", 500)
        finally:
            server_metrics.PROTOCOL.reset(token)
        if status == 200:
            metrics.line("succeeded")
            return success_record(key, line, status, body)
        error = from_openai(status, body)
        if isinstance(error, (NotReady, Overloaded)):
            raise error  # the whole chunk is retried
        metrics.line("failed")
        return error_record(key, line, error.message, f"http_{status}", status, body)

    async def run_lines(self, key: str, lines: list[Line]) -> list[dict[str, Any]]:
        """Run a chunk's lines. One feeder takes a slot before starting each line, so thousands of
        pending lines never wait on the condition at once (every release would wake them all)."""
        results: list[dict[str, Any] | None] = [None] * len(lines)
        tasks: list[asyncio.Future[None]] = []

        failed = False

        async def run(i: int, line: Line) -> None:
            nonlocal failed
            try:
                results[i] = await self._call(key, line)
            except BaseException:
                failed = True
                raise
            finally:
                await self._release()

        try:
            for i, line in enumerate(lines):
                if line.error is not None:
                    results[i] = await self.run_line(key, line)
                    continue
                if failed:
                    break  # e.g. the engine went away: stop feeding, the gather below raises it
                await self._acquire()
                tasks.append(asyncio.ensure_future(run(i, line)))
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

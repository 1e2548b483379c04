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
import logging
import time
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Callable
from typing import Any

from predictors import metrics as server_metrics
from predictors.errors import EvllmError, NotReady, Overloaded, from_openai

from . import metrics
from .batch import Line, error_record, success_record
from .cancel import CancelToken
from .config import BATCH_PRIORITY
from .dataplane import DataPlaneView

logger = logging.getLogger("evllm.eventing")
CANCELLED = "cancelled"  # the error code of lines a cancel stopped


def cancelled_record(key: str, line: Line) -> dict[str, Any]:
    return error_record(key, line, "the batch was cancelled before this line completed", CANCELLED)


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


class LineCancelled(Exception):
    """The job was cancelled while this line waited for a slot."""


class Executor:
    """One per process: every chunk of every job shares the same in-flight budget.

    Slots go round-robin between jobs, not first-come: each job waiting for a slot has a queue of its
    feeders, and a freed slot goes to the job at the head of the rotation, which then moves to the back.
    So a small job submitted while a huge one runs (in sink mode with many of its chunks delivered here at
    once) gets an equal share of the engine and finishes in time proportional to its own size.
    """

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
        self._waiting: OrderedDict[str, deque[asyncio.Future[None]]] = OrderedDict()
        self._watcher: asyncio.Task[None] | None = None

    def _ensure_watcher(self) -> None:
        if self._watcher is None:
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        """Grant waiting lines whenever online load changes (it can lower or raise the limit)."""
        event = self.dataplane.online_changed
        while True:
            await event.wait()
            event.clear()
            self.limit.observe()
            self._grant()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher

    def _grant(self) -> None:
        """Hand free slots to waiting feeders, one job after the other."""
        limit = self.limit.current()
        while self.inflight < limit and self._waiting:
            job, queue = next(iter(self._waiting.items()))
            fut = queue.popleft()
            if queue:
                self._waiting.move_to_end(job)
            else:
                del self._waiting[job]
            if fut.done():
                continue  # its feeder left (cancelled)
            fut.set_result(None)
            self.inflight += 1
        metrics.inflight(self.inflight, limit)

    def _forget(self, job: str, fut: asyncio.Future[None]) -> None:
        queue = self._waiting.get(job)
        if queue is not None and fut in queue:
            queue.remove(fut)
            if not queue:
                del self._waiting[job]

    async def _acquire(self, job: str = "", cancel: CancelToken | None = None) -> None:
        """Take a slot for one line of ``job``; LineCancelled if the job is cancelled meanwhile."""
        self._ensure_watcher()
        if cancel is not None and cancel.cancelled:
            raise LineCancelled()
        if not self._waiting and self.inflight < self.limit.current():
            self.inflight += 1
            metrics.inflight(self.inflight, self.limit.current())
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.setdefault(job, deque()).append(fut)

        def cancelled() -> None:
            if not fut.done():
                fut.set_exception(LineCancelled())

        remove = cancel.on_cancel(cancelled) if cancel is not None else None
        try:
            while not fut.done():
                try:
                    # Timeout: the limit also rises with time (ramp-up) without any event firing.
                    await asyncio.wait_for(asyncio.shield(fut), self.limit.ramp_interval)
                except asyncio.TimeoutError:
                    self._grant()
            fut.result()
        except BaseException:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                self._release()  # granted, but this feeder is leaving
            else:
                fut.cancel()
                self._forget(job, fut)
            raise
        finally:
            if remove is not None:
                remove()

    def _release(self) -> None:
        self.inflight -= 1
        self._grant()

    @contextlib.asynccontextmanager
    async def slot(self, job: str = "") -> AsyncIterator[None]:
        await self._acquire(job)
        try:
            yield
        finally:
            self._release()

    async def run_line(self, key: str, line: Line) -> dict[str, Any]:
        """One line -> its output record. Engine-not-ready propagates (the chunk is retried whole)."""
        if line.error is not None:
            metrics.line("failed")
            return error_record(key, line, line.error, "invalid_request")
        async with self.slot(key):
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

    async def run_lines(
        self, key: str, lines: list[Line], cancel: CancelToken | None = None
    ) -> list[dict[str, Any]]:
        """Run a chunk's lines. Each line waits for its own slot (in its job's queue, so the job gets its
        round-robin share whatever the number of its chunks here), at most ``limit.high`` lines of the
        chunk at once. A fired ``cancel`` cancels the lines in the engine (which aborts them there) and
        the waiting ones; those get cancelled records, the finished ones keep theirs."""
        results: list[dict[str, Any] | None] = [None] * len(lines)
        tasks: set[asyncio.Future[None]] = set()
        running: set[asyncio.Future[None]] = set()
        aborted: set[asyncio.Future[None]] = set()  # running lines this cancel cancelled
        failed = False
        aborted_at: list[float] = []

        def stopped() -> bool:
            return cancel is not None and cancel.cancelled

        async def run(i: int, line: Line) -> None:
            nonlocal failed
            try:
                await self._acquire(key, cancel)
            except LineCancelled:
                results[i] = cancelled_record(key, line)
                return
            except asyncio.CancelledError:
                if not stopped():
                    raise
                results[i] = cancelled_record(key, line)
                return
            if stopped():  # granted just as the job was cancelled
                self._release()
                results[i] = cancelled_record(key, line)
                return
            me = asyncio.current_task()
            assert me is not None
            running.add(me)
            try:
                results[i] = await self._call(key, line)
                if me in aborted:
                    # vLLM's serving classes turn the cancellation into a "Client disconnected" answer
                    # (the request is aborted in the engine all the same): the line was cancelled.
                    results[i] = cancelled_record(key, line)
                    aborted_at.append(time.time())
            except asyncio.CancelledError:
                if not stopped():
                    failed = True
                    raise
                results[i] = cancelled_record(key, line)
                aborted_at.append(time.time())
            except BaseException:
                failed = True
                raise
            finally:
                running.discard(me)
                self._release()

        def abort_running() -> None:
            for t in list(running):
                aborted.add(t)
                t.cancel()

        remove = cancel.on_cancel(abort_running) if cancel is not None else None
        try:
            for i, line in enumerate(lines):
                if stopped():
                    results[i] = cancelled_record(key, line)
                    continue
                if line.error is not None:
                    results[i] = await self.run_line(key, line)
                    continue
                while len(tasks) >= self.limit.high and not failed:
                    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                    for t in tasks - pending:
                        t.result()  # an engine failure raises here
                    tasks = set(pending)
                if failed:
                    break  # e.g. the engine went away: stop feeding, the gather below raises it
                if stopped():  # cancelled while this line waited for room in the window
                    results[i] = cancelled_record(key, line)
                    continue
                tasks.add(asyncio.ensure_future(run(i, line)))
            await asyncio.gather(*tasks)
        except BaseException:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise
        finally:
            if remove is not None:
                remove()
        if cancel is not None and cancel.at is not None and aborted_at:
            latency = max(aborted_at) - cancel.at
            metrics.cancel_latency(latency)
            logger.info(
                "batch %s: %d lines aborted; last one %.3f s after the cancel", key, len(aborted_at), latency
            )
        assert all(r is not None for r in results)
        return results  # type: ignore[return-value]

"""Cancelling a job: a marker in storage (every replica sees it) and, per process, one token per job
that running chunks watch.

The marker ``<job>/cancel.json`` is the truth: a chunk checks it before it starts, and while any chunk of
a job runs on this replica one watcher polls it (``POLL_SECONDS``), so a cancel made on another replica
(or by a ``batch.cancel`` event delivered elsewhere) reaches this one within a poll. A cancel made here
sets the token at once. A fired token stops the job's feeders (no new line starts) and cancels its
in-engine lines, which aborts them in the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import AsyncIterator, Callable

from .storage import Location, StorageError, exists, read_bytes, write_atomic

logger = logging.getLogger("evllm.eventing")

POLL_SECONDS = 0.25


class CancelToken:
    """Fired once, with the wall-clock time of the cancel (from the marker, so latency is measured from
    the request, whichever replica took it)."""

    def __init__(self) -> None:
        self.at: float | None = None
        self._callbacks: list[Callable[[], None]] = []

    @property
    def cancelled(self) -> bool:
        return self.at is not None

    def fire(self, at: float) -> None:
        if self.at is not None:
            return
        self.at = at
        for callback in list(self._callbacks):
            callback()

    def on_cancel(self, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` when fired; returns the function that unregisters it."""
        self._callbacks.append(callback)

        def remove() -> None:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(callback)

        return remove


def write_marker(marker: Location, at: float | None = None) -> float:
    """Write the cancel marker unless it exists; returns the cancel time (the first one wins)."""
    existing = read_marker(marker)
    if existing is not None:
        return existing
    at = time.time() if at is None else at
    write_atomic(marker, json.dumps({"cancelled_at": at}).encode())
    return at


def read_marker(marker: Location) -> float | None:
    if not exists(marker):
        return None
    try:
        return float(json.loads(read_bytes(marker))["cancelled_at"])
    except (StorageError, ValueError, KeyError, TypeError):
        return time.time()  # a marker is a cancel even if its content cannot be read


class Cancellations:
    """This process's tokens: one per job with a chunk running here, plus one polling watcher each."""

    def __init__(self) -> None:
        self._jobs: dict[str, tuple[CancelToken, int, asyncio.Task[None]]] = {}
        self._checked: dict[str, asyncio.Event] = {}

    @contextlib.asynccontextmanager
    async def watch(self, key: str, marker: Location) -> AsyncIterator[CancelToken]:
        """The job's token while a chunk of it runs here; the marker has been read once on entry."""
        if key in self._jobs:
            token, users, task = self._jobs[key]
            self._jobs[key] = (token, users + 1, task)
        else:
            token = CancelToken()
            checked = self._checked[key] = asyncio.Event()
            task = asyncio.ensure_future(self._poll(token, marker, checked))
            self._jobs[key] = (token, 1, task)
        try:
            await self._checked[key].wait()
            yield token
        finally:
            token, users, task = self._jobs[key]
            if users == 1:
                del self._jobs[key]
                del self._checked[key]
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            else:
                self._jobs[key] = (token, users - 1, task)

    def fire(self, key: str, at: float) -> None:
        """A cancel taken on this replica: its running chunks stop now, not at the next poll."""
        if key in self._jobs:
            self._jobs[key][0].fire(at)

    async def _poll(self, token: CancelToken, marker: Location, checked: asyncio.Event) -> None:
        try:
            while not token.cancelled:
                try:
                    at = await asyncio.to_thread(read_marker, marker)
                except Exception as exc:  # a storage hiccup must not end the watch
                    logger.warning("cannot check the cancel marker %s: %s", marker.uri, exc)
                    at = None
                if at is not None:
                    token.fire(at)
                checked.set()
                await asyncio.sleep(POLL_SECONDS)
        finally:
            checked.set()

    async def close(self) -> None:
        tasks = [task for _, _, task in self._jobs.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._jobs.clear()
        self._checked.clear()

"""Bounded admission of work per replica: past the limit a request is refused at once with 429 + Retry-After.

Nothing queues here: the engine already has its own (bounded by this limit) waiting queue, and a request
that cannot start soon is better retried elsewhere (Knative and Eventing retry 429 with backoff) than held
until a client or proxy timeout. While draining (SIGTERM), new work gets 503 instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from . import metrics
from .errors import NotReady, Overloaded


class Admission:
    def __init__(self, limit: int, retry_after: int = 1):
        if limit < 1:
            raise ValueError("the admission limit must be at least 1")
        self.limit = limit
        self.retry_after = retry_after
        self.in_flight = 0
        self.draining = False
        self._idle: asyncio.Event | None = None

    def _set(self, value: int) -> None:
        self.in_flight = value
        metrics.child(metrics.ADMITTED, metrics.model()).set(value)
        if value == 0 and self._idle is not None:
            self._idle.set()

    def acquire(self) -> None:
        """Take one slot, or raise: 503 while draining, 429 when every slot is taken."""
        if self.draining:
            metrics.rejected("draining")
            raise NotReady("Server is shutting down, retry on another replica.")
        if self.in_flight >= self.limit:
            metrics.rejected("overloaded")
            raise Overloaded(
                f"Server is at its limit of {self.limit} concurrent requests, retry later.",
                retry_after=self.retry_after,
            )
        self._set(self.in_flight + 1)

    def release(self) -> None:
        self._set(self.in_flight - 1)

    @contextlib.contextmanager
    def admit(self) -> Iterator[None]:
        """Hold one slot for the duration of a block."""
        self.acquire()
        try:
            yield
        finally:
            self.release()

    async def wait_idle(self) -> None:
        """Return once no admitted request is in flight."""
        if self._idle is None:
            self._idle = asyncio.Event()
        while self.in_flight > 0:
            self._idle.clear()
            await self._idle.wait()

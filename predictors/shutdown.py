"""Graceful shutdown on SIGTERM: stop admitting, finish what is in flight, then let uvicorn exit (code 0).

uvicorn alone closes the listening socket at once (new connections are refused while endpoints still point
at the pod) and cancels requests after its timeout. Here the first SIGTERM/SIGINT instead:

1. marks the replica draining: readiness answers 503 (Kubernetes/Knative stop routing here), new work
   gets 503 with a JSON error (clients and Knative retry elsewhere);
2. keeps serving until every admitted request (streams included) has finished, at least
   ``--drain_seconds`` (endpoint propagation) and at most ``--grace_period`` seconds;
3. then hands the signal to uvicorn, which closes connections and runs the app's shutdown (eventing
   stops its background batch runners there; chunks are all-or-nothing, so a stopped chunk is untouched).

A second signal skips the wait (uvicorn's own force-exit behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import time
from types import FrameType
from typing import Any

from . import metrics
from .admission import Admission

logger = logging.getLogger("evllm.shutdown")


class GracefulShutdown:
    def __init__(self, admission: Admission, engine: Any, grace_period: float, drain_seconds: float):
        self.admission = admission
        self.engine = engine
        self.grace_period = grace_period
        self.drain_seconds = drain_seconds
        self.started: float | None = None
        self._task: asyncio.Task[None] | None = None

    def install(self, server: Any) -> None:
        """Intercept a uvicorn Server's signal handling (it installs ``server.handle_exit`` when serving)."""
        original = server.handle_exit

        def handle_exit(sig: int, frame: FrameType | None) -> None:
            if self.started is not None:
                original(sig, frame)  # second signal: let uvicorn stop now
                return
            try:
                # Signal handlers run in the loop's (main) thread, between bytecodes.
                loop = asyncio.get_running_loop()
            except RuntimeError:
                original(sig, frame)  # not serving yet: nothing to drain
                return
            self.begin()
            loop.call_soon_threadsafe(self._schedule, original, sig, frame)

        server.handle_exit = handle_exit

    def begin(self) -> None:
        self.started = time.monotonic()
        self.admission.draining = True
        self.engine.draining = True  # readiness false, NotReady for work that slips past admission
        metrics.DRAINING.labels(metrics.model()).set(1)
        logger.info(
            "SIGTERM: draining %d request(s) in flight (grace period %.0fs)",
            self.admission.in_flight,
            self.grace_period,
        )

    def _schedule(self, original: Any, sig: int, frame: FrameType | None) -> None:
        self._task = asyncio.ensure_future(self.drain(original, sig, frame))

    async def drain(self, original: Any, sig: int, frame: FrameType | None) -> None:
        try:
            if self.drain_seconds > 0:
                await asyncio.sleep(self.drain_seconds)
            left = self.grace_period - self.drain_seconds
            try:
                await asyncio.wait_for(self.admission.wait_idle(), timeout=max(left, 0.0))
                logger.info("drained: no request in flight; stopping")
            except asyncio.TimeoutError:
                logger.warning(
                    "grace period over with %d request(s) still in flight; stopping anyway",
                    self.admission.in_flight,
                )
        finally:
            original(sig, frame)

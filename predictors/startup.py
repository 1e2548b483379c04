"""Where a start goes: each phase from process start to ready, logged once and exported.

``evllm_startup_seconds{model,phase}`` holds how long each phase of this replica's start took:

- ``imports``: process start -> evllm's code runs (Python, KServe, FastAPI imports)
- ``settings``: flags, the demo model / model directory check, KServe's app and routes
- ``engine_process``: the engine config, then vLLM's engine core and worker processes start (each imports
  vLLM and torch) up to "Starting to load model"
- ``weights``: the weights are loaded ("Loading weights took" / "Model loading took")
- ``compile``: torch.compile and the warm-up run it needs (Dynamo tracing and Inductor, or their cache)
- ``kv_cache``: profiling, the KV cache, CUDA graph capture: up to vLLM's "init engine (...) took"
- ``http_ready``: the engine handshake and the server answering ready

The engine phases happen in vLLM's own processes, which tell the world only through their log lines
(vLLM logs to stdout). `EngineLog` reads those lines; the same parser measures `vllm serve` in the
benchmark, so both servers' phases are cut at the same lines.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Callable

from prometheus_client import Gauge

logger = logging.getLogger("evllm.startup")

PHASES = ("imports", "settings", "engine_process", "weights", "compile", "kv_cache", "http_ready")

# vLLM 0.32's log lines that end each engine phase (the first seen wins). GPU and CPU model runners
# log differently around compilation: the GPU path (VLLM_COMPILE mode) logs "torch.compile took", the
# CPU path (DYNAMO_TRACE_ONCE) only brackets its warm-up run ("Warming up done.").
ENGINE_MARKERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("engine_process", ("Starting to load model",)),
    ("weights", ("Loading weights took", "Model loading took")),
    (
        "compile",
        (
            "torch.compile took",
            "torch.compile and initial profiling/warmup run together took",
            "Warming up done.",
        ),
    ),
    ("kv_cache", ("init engine (profile, create kv cache, warmup model) took",)),
)

STARTUP_SECONDS = Gauge(
    "evllm_startup_seconds",
    "Seconds each phase of this replica's start took (imports, settings, engine_process, weights, "
    "compile, kv_cache, http_ready); set once per phase.",
    ["model", "phase"],
)


def process_start_time() -> float:
    """When this process was created (wall clock), so `imports` counts the interpreter's own start."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # no psutil, or no /proc: count from the first call instead
        return time.time()


class Timeline:
    """The phases of one start, in order. Ending a phase ends the phases before it that were skipped
    (0 s: e.g. `compile` with --enforce-eager); a phase already ended is not logged twice."""

    def __init__(self, model: str = "model", started: float | None = None):
        self.model = model
        self.started = process_start_time() if started is None else started
        self.last = self.started
        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()

    def end(self, phase: str, at: float | None = None) -> None:
        at = time.time() if at is None else at
        with self._lock:
            if phase in self.seconds:
                return
            for earlier in PHASES[: PHASES.index(phase)]:
                if earlier not in self.seconds:
                    self._record(earlier, 0.0)
            self._record(phase, max(at - self.last, 0.0))
            self.last = max(at, self.last)
        if phase == PHASES[-1]:
            logger.info("ready %.2f s after process start", self.last - self.started)

    def _record(self, phase: str, seconds: float) -> None:
        self.seconds[phase] = seconds
        STARTUP_SECONDS.labels(self.model, phase).set(seconds)
        logger.info("startup phase %s took %.2f s", phase, seconds)

    @property
    def total(self) -> float:
        return self.last - self.started


class EngineLog:
    """Feeds vLLM's log lines (with their arrival time) into a timeline's engine phases."""

    def __init__(self, on_phase: Callable[[str, float], None]):
        self.on_phase = on_phase
        self._next = 0  # index into ENGINE_MARKERS: markers are matched in order

    @property
    def done(self) -> bool:
        return self._next >= len(ENGINE_MARKERS)

    def feed(self, line: str, at: float) -> None:
        for i in range(self._next, len(ENGINE_MARKERS)):
            phase, markers = ENGINE_MARKERS[i]
            if any(m in line for m in markers):
                self._next = i + 1
                self.on_phase(phase, at)
                return


class StdoutTap:
    """Reads what this process and the processes it starts write to stdout, forwarding every byte.

    vLLM's engine core and workers are spawned processes that inherit file descriptor 1: while the tap
    is open, they inherit its pipe, so their log lines pass through `feed` with their arrival time. The
    tap is closed once the engine is up (this process writes to the real stdout again); the children
    keep the pipe, and the reader keeps forwarding their output until they exit.
    """

    def __init__(self, feed: Callable[[str, float], None]):
        self.feed: Callable[[str, float], None] | None = feed
        self._saved: int | None = None
        self._thread: threading.Thread | None = None

    def open(self) -> None:
        read_end, write_end = os.pipe()
        sys.stdout.flush()
        self._saved = os.dup(1)
        os.dup2(write_end, 1)
        os.close(write_end)
        self._thread = threading.Thread(
            target=self._forward, args=(read_end, self._saved), name="evllm-stdout-tap", daemon=True
        )
        self._thread.start()

    def close(self) -> None:
        """This process writes to the real stdout again (the forwarder still serves the children)."""
        if self._saved is None:
            return
        sys.stdout.flush()
        os.dup2(self._saved, 1)

    def _forward(self, read_end: int, out: int) -> None:
        pending = b""
        while chunk := os.read(read_end, 65536):
            view = memoryview(chunk)
            while view:
                try:
                    view = view[os.write(out, view) :]
                except OSError:  # the real stdout went away: keep draining so children never block
                    break
            if self.feed is None:
                continue
            now = time.time()
            lines = (pending + chunk).split(b"\n")
            pending = lines.pop()[-4096:]
            for line in lines:
                try:
                    self.feed(line.decode("utf-8", "replace"), now)
                except Exception:  # a parser bug must never stop the forwarding
                    logger.exception("startup log parser failed; engine phases are not measured")
                    self.feed = None
                    break
        os.close(read_end)

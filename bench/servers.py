"""Start `vllm serve`, `evllm serve` and `run_batch` the same way, one engine at a time (or attach to an
`evllm serve` someone else started: `python -m bench --url`).

Every engine runs under the engine lock shared with the test suite (/tmp/evllm-engine.lock), so a
benchmark never overlaps a test session's engine on this small machine. Servers start in our own session
(no setsid): a new session gets its own autogroup, i.e. half the CPU time, and measured 5x slower.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from tests.server import ENGINE_LOCK, ROOT, _descendants, free_port

MODEL_NAME = "demo"
ADAPTER = "demo-lora"  # the demo LoRA adapter, in the LoRA runs


_held = 0  # re-entrant within this process: a repeat holds it across its engines


@contextlib.contextmanager
def engine_lock(timeout: float = 3600.0) -> Iterator[None]:
    """The test suite's engine lock (re-entrant here), with a timeout instead of waiting forever."""
    global _held
    if _held:
        _held += 1
        try:
            yield
        finally:
            _held -= 1
        return
    ENGINE_LOCK.touch(exist_ok=True)
    with open(ENGINE_LOCK) as fh:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{ENGINE_LOCK} still held after {timeout:.0f}s") from None
                time.sleep(0.5)
        _held = 1
        try:
            yield
        finally:
            _held = 0
            fcntl.flock(fh, fcntl.LOCK_UN)


def _ready(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


class Server:
    """`kind` is "vllm" (vllm's OpenAI api_server) or "evllm" (`python -m evllm serve`, the container's
    command; the model directory is always explicit)."""

    def __init__(
        self,
        kind: str,
        model_dir: Path,
        engine_args: list[str],
        env: dict[str, str],
        log_dir: Path,
        storage_root: Path | None = None,
    ):
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.grpc_target: str | None = None  # host:port of evllm's gRPC server
        py = sys.executable
        if kind == "vllm":
            self.cmd = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model_dir),
                        "--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(self.port),
                        *engine_args]  # fmt: skip
            self.ready_path = "/health"
            self.openai_prefix = ""
        elif kind == "evllm":
            grpc_port = free_port()
            self.grpc_target = f"127.0.0.1:{grpc_port}"
            self.cmd = [py, "-m", "evllm", "serve", "--model_name", MODEL_NAME, "--model_dir", str(model_dir),
                        "--http_port", str(self.port), "--enable_grpc", "true", "--grpc_port", str(grpc_port),
                        *engine_args]  # fmt: skip
            if storage_root is not None:
                self.cmd += ["--storage_roots", str(storage_root)]
            self.ready_path = "/v2/health/ready"
            self.openai_prefix = "/openai"
        else:
            raise ValueError(kind)
        self.env = {**os.environ, **env}
        self.log_path = log_dir / f"{kind}-{self.port}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.cold_start: float | None = None
        # The start's log lines with their arrival (seconds after the process started, to ~0.1 s).
        self.lines: list[tuple[float, str]] = []

    def start(self, timeout: float = 600.0) -> Server:
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        t0 = time.perf_counter()
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.cmd, cwd=ROOT, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        with open(self.log_path, "rb") as reader:
            reader.seek(offset)
            pending = b""
            while time.monotonic() < deadline:
                chunk = reader.read()
                if chunk:
                    now = time.perf_counter() - t0
                    *done, pending = (pending + chunk).split(b"\n")
                    self.lines += [(now, line.decode("utf-8", "replace")) for line in done]
                if self.proc.poll() is not None:
                    raise RuntimeError(f"{self.kind} exited with {self.proc.returncode}:\n{self.tail()}")
                if _ready(self.url + self.ready_path):
                    self.cold_start = time.perf_counter() - t0
                    return self
                time.sleep(0.1)
        self.stop()
        raise TimeoutError(f"{self.kind} not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            for pid in _descendants(self.proc.pid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.kill()
            self.proc.wait(30)


@dataclass
class Attached:
    """An `evllm serve` already running at `url` (started by someone else: nothing to start or stop)."""

    url: str
    kind: str = "evllm"
    openai_prefix: str = "/openai"
    cold_start: float | None = None  # not measured: the server was up before the bench
    grpc_target: str | None = None  # host:port of its gRPC server, if it serves one (--grpc)

    def check(self) -> Attached:
        if not _ready(self.url + "/v2/health/ready"):
            raise RuntimeError(f"no ready evllm serve at {self.url} (GET /v2/health/ready)")
        return self


@contextlib.contextmanager
def running(server: Server) -> Iterator[Server]:
    with engine_lock():
        try:
            yield server.start()
        finally:
            server.stop()


def run_batch(
    model_dir: Path, engine_args: list[str], env: dict[str, str], inp: Path, out: Path, log_dir: Path
) -> float:
    """`vllm run-batch` end to end (process start to exit, engine start included): seconds."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.run_batch", "-i", str(inp), "-o", str(out),
           "--model", str(model_dir), "--served-model-name", MODEL_NAME, *engine_args]  # fmt: skip
    return timed_run("run_batch", cmd, env, log_dir / f"run_batch-{inp.stem}.log")


def timed_run(what: str, cmd: list[str], env: dict[str, str], log_path: Path) -> float:
    """Run an engine-starting command to its end under the engine lock, output to ``log_path``: seconds."""
    with engine_lock(), open(log_path, "ab") as log:
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log)
        elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = "\n".join(log_path.read_text(errors="replace").splitlines()[-40:])
        raise RuntimeError(f"{what} exited with {proc.returncode}:\n{tail}")
    return elapsed


def work_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="evllm-bench-"))

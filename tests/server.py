"""Start `evllm serve` (or `vllm serve`) as a subprocess for tests, the way a user would."""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
# Only one engine runs at a time on this 2-core machine: concurrent test sessions queue on this lock.
ENGINE_LOCK = Path(tempfile.gettempdir()) / "evllm-engine.lock"


# The environment as the test session found it, before any test's monkeypatch.setenv: servers start in a
# background thread while in-process tests run and may set EVLLM_* variables for themselves.
SESSION_ENV = dict(os.environ)


def clean_env(**extra: str) -> dict[str, str]:
    """The session's environment without any VLLM_* variable: servers start the way `make serve` starts
    them, so the KV cache size and every other engine default are evllm's own choices."""
    env = {k: v for k, v in SESSION_ENV.items() if not k.startswith("VLLM_")}
    return {**env, "PYTHONUNBUFFERED": "1", **extra}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """One server subprocess; logs go to a file the test can read when something fails."""

    def __init__(self, args: list[str], *, env: dict[str, str] | None = None, log_name: str = "server"):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.args = args
        self.env = clean_env(**(env or {}))
        self.log_path = Path(tempfile.mkdtemp(prefix="evllm-test-")) / f"{log_name}.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.live_before_ready = False

    def command(self) -> list[str]:
        # `make serve` runs `evllm serve`; `python -m evllm` is the same entry point (and the container's).
        return [sys.executable, "-m", "evllm", "serve", "--http_port", str(self.port), *self.args]

    def start(self, timeout: float = 300.0, ready_path: str = "/v2/health/ready") -> ServerProcess:
        with open(self.log_path, "ab") as log:
            # Same session as the test process: a new session would get half the cores (autogroup).
            self.proc = subprocess.Popen(self.command(), cwd=ROOT, env=self.env, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + ready_path, timeout=2).status_code == 200:
                    return self
                # Seen only while the engine is still starting: liveness must answer by then.
                live = httpx.get(self.url + "/v2/health/live", timeout=2).status_code == 200
                self.live_before_ready = self.live_before_ready or live
            time.sleep(0.5)
        self.stop()
        raise TimeoutError(f"server not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def kill(self) -> None:
        """SIGKILL the whole process group we started (server + engine core + workers)."""
        if self.proc and self.proc.poll() is None:
            children = _descendants(self.proc.pid)
            # The server first, so it cannot answer anything after this point; then its engine processes.
            self.proc.kill()
            for pid in children:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            self.proc.wait(30)

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.proc.returncode


def _descendants(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,ppid="], capture_output=True, text=True).stdout
    children: dict[int, list[int]] = {}
    for line in out.splitlines():
        p, pp = (int(x) for x in line.split())
        children.setdefault(pp, []).append(p)
    result, todo = [], [pid]
    while todo:
        for c in children.get(todo.pop(), []):
            result.append(c)
            todo.append(c)
    return result


@contextlib.contextmanager
def engine_lock():
    ENGINE_LOCK.touch(exist_ok=True)
    with open(ENGINE_LOCK) as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)

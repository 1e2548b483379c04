"""Session fixtures: the demo model, the offline reference, and the real engines of the run.

A run starts three engines, never two at once: vLLM's offline `LLM` (the reference output, through the base
model and through the demo LoRA adapter), the session server (`server`: started exactly as `make serve`
starts it, so it serves the demo adapter as `demo-lora`, with a test broker as its K_SINK) and, after
the crash test kills that one, the `restarted` server (same storage, plus auth and tight limits), which
the SIGTERM test stops last. Everything else runs in-process (tests/inprocess.py).

Engine-free tests run first; meanwhile the first two engines start in a background thread (`Engines`),
so their ~1.5 minutes of start-up overlap with the in-process tests instead of adding to them.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from predictors.config import ServerConfig
from predictors.demo_model import demo_dir, ensure_demo_adapter, ensure_demo_model
from tests.server import ROOT, ServerProcess, clean_env, engine_lock, free_port

MODEL_NAME = "demo"
# `make serve` also serves the demo LoRA adapter under this name, with these engine flags.
ADAPTER_NAME = "demo-lora"
MAX_LORA_RANK = 8
LORA_FLAGS = [
    "--enable-lora",
    "--max-lora-rank",
    str(MAX_LORA_RANK),
    "--lora-modules",
    f"{ADAPTER_NAME}=demo",
]
# Greedy reference prompts: every served path must reproduce vLLM's offline output token for token.
REFERENCE_PROMPTS = [
    "Hello world",
    "The quick brown fox",
    "Once upon a time there was",
    "Serverless inference",
]
REFERENCE_MAX_TOKENS = 16

# Phases of a run that change the real servers, in this order after every other test: the crash test
# kills the session server and starts `restarted`; tests on `restarted`; SIGTERM stops it.
LIFECYCLE = ("crash", "restarted", "sigterm")


@pytest.hookimpl(trylast=True)  # after -m/-k deselection: only the tests that will run start engines
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    def order(item: pytest.Item) -> tuple[int, bool]:
        marker = item.get_closest_marker("lifecycle")
        phase = 0 if marker is None else 1 + LIFECYCLE.index(marker.args[0])
        return phase, item.get_closest_marker("slow") is not None

    items.sort(key=order)
    if not config.option.collectonly and any(item.get_closest_marker("slow") for item in items):
        ENGINES.start()


def pytest_sessionfinish(session: pytest.Session) -> None:
    ENGINES.close()


def default_cache_dir() -> Path:
    """Where `--model_dir demo` generates the demo model: `make serve`'s own default (or EVLLM_CACHE_DIR).
    A stable path, because vLLM keys its compile cache on the model path: a new temporary directory per
    run would recompile (~20 s) at every engine start."""
    return Path(os.environ.get("EVLLM_CACHE_DIR") or ServerConfig().cache_dir)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    return ENGINES.cache_dir


@pytest.fixture(scope="session")
def demo_model_dir(cache_dir: Path) -> Path:
    """The demo model the servers serve (generated here first, byte-identical to what they generate)."""
    return ensure_demo_model(demo_dir(cache_dir))


@pytest.fixture(scope="session")
def storage_root() -> Path:
    """The one local directory the real servers may read batch input from and write output to."""
    return ENGINES.storage_root


def compute_reference(model_dir: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """vLLM offline LLM.generate output for REFERENCE_PROMPTS (greedy), with the session server's LoRA
    flags: through the base model, and through the demo adapter."""
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "tests" / "offline_reference.py"),
            str(model_dir),
            str(REFERENCE_MAX_TOKENS),
            json.dumps(REFERENCE_PROMPTS),
            str(ensure_demo_adapter(model_dir)),
            str(MAX_LORA_RANK),
        ],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    found = {}
    for line in proc.stdout.splitlines():
        kind, _, payload = line.partition(" ")
        if kind in ("REFERENCE", "ADAPTER_REFERENCE"):
            found[kind] = json.loads(payload)
    assert proc.returncode == 0 and len(found) == 2, proc.stderr[-3000:]
    return found["REFERENCE"], found["ADAPTER_REFERENCE"]


@pytest.fixture(scope="session")
def offline_reference() -> list[dict[str, Any]]:
    return ENGINES.wait().reference


@pytest.fixture(scope="session")
def adapter_reference() -> list[dict[str, Any]]:
    """The same prompts through the demo adapter (offline LLM.generate with its LoRARequest)."""
    return ENGINES.wait().adapter_reference


class Broker:
    """Plays the Knative broker behind K_SINK: records every event the server emits and, like a Trigger,
    delivers each batch.chunk back to the server's /events (retrying 429/503 and dropped connections,
    as Knative does). `forward = False` leaves delivery to the test (crash and redelivery tests)."""

    def __init__(self) -> None:
        self.events: list[CloudEvent] = []
        self.lock = threading.Lock()
        self.forward = True
        self.target: str | None = None  # the server's base URL
        self.headers: dict[str, str] = {}  # credentials a Trigger would send (OIDC, API key)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                event = from_http(dict(self.headers), body)
                with outer.lock:
                    outer.events.append(event)
                self.send_response(202)
                self.end_headers()
                if outer.forward and outer.target and event["type"].endswith(".batch.chunk"):
                    threading.Thread(target=outer._deliver, args=(event,), daemon=True).start()

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _deliver(self, event: CloudEvent) -> None:
        for _ in range(60):
            try:
                status, _ = deliver(str(self.target), event, headers=self.headers)
            except httpx.HTTPError:
                status = 503
            if status not in (429, 502, 503, 504):
                return
            threading.Event().wait(1.0)

    def chunks(self, job_id: str) -> dict[int, CloudEvent]:
        """The latest chunk event per index (redeliveries re-emit the same ids)."""
        with self.lock:
            return {e.data["chunk"]: e for e in self.events if e["type"].endswith(".batch.chunk")
                    and e.data["job_id"] == job_id}  # fmt: skip

    def of_type(self, suffix: str) -> list[CloudEvent]:
        with self.lock:
            return [e for e in self.events if e["type"].endswith(suffix)]


def deliver(
    url: str, event: CloudEvent, *, headers: dict[str, str] | None = None, timeout: float = 300
) -> tuple[int, CloudEvent | None]:
    """POST one event to a predictor's /events in binary mode, as a Trigger does: (status, reply)."""
    ce_headers, body = to_binary(event)
    resp = httpx.post(
        url + "/events", headers={**ce_headers, **(headers or {})}, content=body, timeout=timeout
    )
    if resp.status_code == 200 and resp.content:
        return 200, from_http(dict(resp.headers), resp.content)
    return resp.status_code, None


@pytest.fixture(scope="session")
def broker() -> Broker:
    return ENGINES.broker


def server_env(cache_dir: Path, storage_root: Path, broker: Broker) -> dict[str, str]:
    """Deployment settings come from the environment (as in a pod); no VLLM_* variable is set."""
    return {
        "EVLLM_CACHE_DIR": str(cache_dir),
        "EVLLM_STORAGE_ROOTS": str(storage_root),
        "K_SINK": broker.url,
    }


class Engines:
    """The offline reference, then the session server: started once, in the background, in that order,
    under the cross-session engine lock (held until the session ends: `restarted` starts inside it)."""

    def __init__(self) -> None:
        self.cache_dir = default_cache_dir()
        self.storage_root = Path(tempfile.mkdtemp(prefix="evllm-storage-"))
        self.broker = Broker()
        self.reference: list[dict[str, Any]] = []
        self.adapter_reference: list[dict[str, Any]] = []
        self.server: ServerProcess | None = None
        self.grpc_port = 0
        self.error: BaseException | None = None
        self._done = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock: contextlib.AbstractContextManager[None] | None = None

    def start(self) -> None:
        if self._thread is None:
            self.broker.thread.start()
            self._thread = threading.Thread(target=self._run, name="evllm-engines", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        try:
            self._lock = engine_lock()
            self._lock.__enter__()
            model_dir = ensure_demo_model(demo_dir(self.cache_dir))
            self.reference, self.adapter_reference = compute_reference(model_dir)
            self.grpc_port = free_port()
            self.server = ServerProcess(
                # `make serve`'s command line (the demo model and the demo adapter), plus gRPC.
                [
                    "--model_name",
                    MODEL_NAME,
                    "--model_dir",
                    "demo",
                    *LORA_FLAGS,
                    "--enable_grpc",
                    "true",
                    "--grpc_port",
                    str(self.grpc_port),
                ],
                env=server_env(self.cache_dir, self.storage_root, self.broker),
                log_name="session-server",
            )
            # Polled on the model's ready path, as the ClusterServingRuntime's readinessProbe does.
            self.server.start(ready_path=f"/v2/models/{MODEL_NAME}/ready")
            self.broker.target = self.server.url
        except BaseException as exc:
            self.error = exc
        finally:
            self._done.set()

    def wait(self) -> Engines:
        self.start()
        self._done.wait()
        if self.error is not None:
            raise RuntimeError(f"the session's engines did not start: {self.error}") from self.error
        return self

    def close(self) -> None:
        if self._thread is None:
            return
        self._done.wait()
        if self.server is not None:
            self.server.stop()
        if self._lock is not None:
            self._lock.__exit__(None, None, None)
        self.broker.server.shutdown()
        self.broker.server.server_close()


ENGINES = Engines()


@pytest.fixture(scope="session")
def server() -> ServerProcess:
    engines = ENGINES.wait()
    assert engines.server is not None
    return engines.server


@pytest.fixture(scope="session")
def grpc_url(server: ServerProcess) -> str:
    """The session server's gRPC endpoint (OIP V2 + ModelStreamInfer)."""
    return f"127.0.0.1:{ENGINES.grpc_port}"


# The restarted server's settings (tests assert against these numbers).
API_KEY = "restarted-key-0123456789"
MAX_PROMPT_TOKENS = 48
MAX_TOKENS_LIMIT = 24
DRAIN_SECONDS = 3
GRACE_PERIOD = 40


@pytest.fixture(scope="session")
def restarted(
    server: ServerProcess, cache_dir: Path, storage_root: Path, broker: Broker
) -> Iterator[ServerProcess]:
    """The session server after it was killed (lifecycle "crash"), started again on the same storage and
    sink with authentication and tight limits, as a pod's replacement with a new config would be.
    Runs inside the engine lock that `Engines` holds for the whole session."""
    server.kill()
    proc = ServerProcess(
        [
            "--model_name", MODEL_NAME, "--model_dir", "demo",
            "--max_prompt_tokens", str(MAX_PROMPT_TOKENS),
            "--max_tokens_limit", str(MAX_TOKENS_LIMIT),
            "--drain_seconds", str(DRAIN_SECONDS),
            "--grace_period", str(GRACE_PERIOD),
        ],
        env={**server_env(cache_dir, storage_root, broker), "EVLLM_API_KEYS": API_KEY},
        log_name="restarted-server",
    )  # fmt: skip
    proc.start()
    broker.target = proc.url
    broker.headers = {"Authorization": f"Bearer {API_KEY}"}
    try:
        yield proc
    finally:
        proc.stop()

"""Sink mode and crash recovery on a real engine: one extra `evllm serve` with K_SINK set.

A test HTTP sink plays the Knative broker: it receives the predictor's batch.chunk events, and the test
delivers them back to /events the way a Trigger would (including duplicates and redeliveries after a
SIGKILL). The same server process is used for both parts, so only one extra engine start (+1 restart).
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from tests.conftest import MODEL_NAME
from tests.server import TEST_ENGINE_ARGS, ServerProcess

from .batchdata import check_outputs, completion_line, mixed_lines

pytestmark = pytest.mark.slow


class Broker:
    """Records every event POSTed to it (the K_SINK), answering 202 like a broker ingress."""

    def __init__(self) -> None:
        self.events: list[CloudEvent] = []
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                event = from_http(dict(self.headers), body)
                with outer.lock:
                    outer.events.append(event)
                self.send_response(202)
                self.end_headers()

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def chunks(self, job_id: str) -> dict[int, CloudEvent]:
        """The latest chunk event per index (redeliveries re-emit the same ids)."""
        with self.lock:
            return {e.data["chunk"]: e for e in self.events if e["type"].endswith(".batch.chunk")
                    and e.data["job_id"] == job_id}  # fmt: skip


@pytest.fixture
def broker() -> Iterator[Broker]:
    b = Broker()
    b.thread.start()
    yield b
    b.server.shutdown()
    b.server.server_close()


def deliver(url: str, event: CloudEvent, timeout: float = 300) -> tuple[int, CloudEvent | None]:
    headers, body = to_binary(event)
    resp = httpx.post(url + "/events", headers=headers, content=body, timeout=timeout)
    if resp.status_code == 200:
        return 200, from_http(dict(resp.headers), resp.content)
    return resp.status_code, None


def submitted(job_id: str, data: dict, id_: str) -> CloudEvent:
    attrs = {"type": "dev.evllm.batch.submitted", "source": "/tests/sink", "id": id_, "model": MODEL_NAME}
    return CloudEvent(attrs, {"job_id": job_id, **data})


def _generated_tokens(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total")
    )


def test_sink_mode_and_sigkill_redelivery(demo_model_dir: Path, tmp_path: Path, broker: Broker) -> None:
    root = tmp_path / "storage"
    root.mkdir()
    proc = ServerProcess(
        ["--model_name", MODEL_NAME, "--model_dir", str(demo_model_dir), "--storage_roots", str(root),
         *TEST_ENGINE_ARGS],
        env={"K_SINK": broker.url},
        log_name="sink-server",
    )  # fmt: skip
    proc.start()
    try:
        # Part 1: sink mode. The job's chunks go to the broker as events, not run in-process.
        lines, good, bad = mixed_lines(10)
        (root / "a.jsonl").write_text("\n".join(lines) + "\n")
        sub = submitted("sink-a", {"input": str(root / "a.jsonl"), "output": str(root / "out"), "chunk_size": 4},
                        "sub-a")  # fmt: skip
        status, reply = deliver(proc.url, sub)
        assert status == 200 and reply is not None and reply["type"] == "dev.evllm.batch.progress", (
            proc.tail()
        )
        chunks = broker.chunks("sink-a")
        assert sorted(chunks) == [0, 1, 2, 3]
        time.sleep(0.5)
        assert not (root / "out" / "sink-a" / "parts").exists()  # nothing ran in-process
        replies = []
        for index in [0, 0, 1, 2, 3, 3, 1]:  # duplicates, as a broker may deliver
            status, reply = deliver(proc.url, chunks[index])
            assert status == 200 and reply is not None
            replies.append(reply)
        completed = [r for r in replies if r["type"] == "dev.evllm.batch.completed"]
        assert len({r["id"] for r in completed}) == 1 and len(completed) >= 1
        check_outputs(root / "out" / "sink-a", good, bad)

        # Part 2: SIGKILL in the middle of a chunk, restart, redeliver.
        # ignore_eos + 900 tokens x 16 lines: a chunk takes seconds on CPU, so the kill lands inside it.
        heavy = [json.dumps(completion_line(f"k-{i}", f"story {i}", max_tokens=900, ignore_eos=True))
                 for i in range(36)]  # fmt: skip
        (root / "b.jsonl").write_text("\n".join(heavy) + "\n")
        sub = submitted("kill-b", {"input": str(root / "b.jsonl"), "output": str(root / "out"), "chunk_size": 16},
                        "sub-b")  # fmt: skip
        assert deliver(proc.url, sub)[0] == 200
        chunks = broker.chunks("kill-b")
        assert sorted(chunks) == [0, 1, 2]
        status, reply = deliver(proc.url, chunks[0])
        assert status == 200 and reply is not None and reply.data["chunks_done"] == 1
        # Chunk 1 is in flight when the server dies (a broker would see the connection drop and retry).
        outcome: list[object] = []

        def in_flight() -> None:
            try:
                outcome.append(deliver(proc.url, chunks[1]))
            except httpx.HTTPError as exc:
                outcome.append(exc)

        t = threading.Thread(target=in_flight)
        generated = _generated_tokens(proc.url)
        t.start()
        # Kill once the engine is generating for chunk 1 (not after a fixed sleep: machines differ).
        deadline = time.monotonic() + 30
        while _generated_tokens(proc.url) <= generated and time.monotonic() < deadline:
            time.sleep(0.05)
        part1 = root / "out" / "kill-b" / "parts" / "chunk-000001.jsonl"
        assert not part1.exists(), "chunk finished before the kill: make it heavier"
        proc.kill()
        t.join(60)
        assert outcome and isinstance(outcome[0], httpx.HTTPError)
        assert not part1.exists()

        proc.start()
        # Redelivery: the submitted event again (re-emits only the missing chunks) and every chunk event.
        before = len(broker.events)
        assert deliver(proc.url, sub)[0] == 200
        assert sorted(e.data["chunk"] for e in broker.events[before:]) == [1, 2]
        replies = [deliver(proc.url, chunks[i])[1] for i in (1, 0, 2, 1)]
        completed = [r for r in replies if r is not None and r["type"] == "dev.evllm.batch.completed"]
        assert len({r["id"] for r in completed}) == 1
        check_outputs(root / "out" / "kill-b", {f"k-{i}" for i in range(36)}, 0)
    finally:
        proc.stop()

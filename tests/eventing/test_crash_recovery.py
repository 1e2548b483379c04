"""Sink mode and crash recovery on the real engine, with the test delivering the broker's chunk events by
hand (`broker.forward = False`), the way a Knative Trigger may: late, twice, or again after a crash.

1. `server`, in the normal order: batch.submitted emits one batch.chunk per chunk to K_SINK and runs
   nothing itself; duplicate deliveries complete the job once.
2. lifecycle "crash", `server`: the engine core is SIGKILLed while a chunk runs. The delivery fails in a
   way Knative retries (5xx or a dropped connection), the replica reports itself dead, nothing partial is
   written; then the whole pod goes (the kubelet's restart).
3. lifecycle "restarted", `restarted` (same storage and broker; API keys on): redelivering the
   submitted event re-emits only the missing chunks, and the chunk events, duplicates included,
   complete the job exactly once.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from cloudevents.http import CloudEvent

from tests.conftest import API_KEY, MAX_TOKENS_LIMIT, MODEL_NAME, Broker, deliver
from tests.server import ServerProcess, _descendants

from .batchdata import check_outputs, completion_line, mixed_lines, read_jsonl

pytestmark = pytest.mark.slow

CRASH_JOB = "crash-job"  # the crash test leaves it half done; the restarted test finishes it
HEAVY_LINES, HEAVY_CHUNK, HEAVY_TOKENS = 36, 16, 900


@pytest.fixture
def by_hand(broker: Broker) -> Iterator[Broker]:
    """The session broker recording only: chunk events reach the server when the test delivers them."""
    broker.forward = False
    try:
        yield broker
    finally:
        broker.forward = True


def submitted(job_id: str, data: dict, id_: str) -> CloudEvent:
    attrs = {"type": "dev.evllm.batch.submitted", "source": "/tests/crash", "id": id_, "model": MODEL_NAME}
    return CloudEvent(attrs, {"job_id": job_id, **data})


def crash_job(storage_root: Path) -> tuple[CloudEvent, Path]:
    """The heavy job (its batch.submitted event and its output directory), the same in both phases:
    ignore_eos + 900 tokens x 16 lines per chunk, so a chunk takes seconds and the kill lands inside it."""
    root = storage_root / "crash"
    root.mkdir(exist_ok=True)
    inp = root / "in.jsonl"
    if not inp.exists():
        lines = [completion_line(f"k-{i}", f"story {i}", max_tokens=HEAVY_TOKENS, ignore_eos=True)
                 for i in range(HEAVY_LINES)]  # fmt: skip
        inp.write_text("".join(json.dumps(line) + "\n" for line in lines))
    data = {"input": str(inp), "output": str(root / "out"), "chunk_size": HEAVY_CHUNK}
    return submitted(CRASH_JOB, data, "sub-crash"), root / "out" / CRASH_JOB


def generated_tokens(url: str) -> float:
    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:generation_tokens_total")
    )


def engine_core_pid(server: ServerProcess) -> int:
    """The server's EngineCore child (vLLM titles it VLLM::EngineCore)."""
    assert server.proc is not None
    found = {}
    for pid in _descendants(server.proc.pid):
        try:
            found[pid] = (
                Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            )
        except OSError:
            continue
    cores = [pid for pid, cmd in found.items() if "EngineCore" in cmd]
    assert len(cores) == 1, found
    return cores[0]


def test_sink_mode_emits_chunks_and_duplicates_complete_once(
    server, by_hand: Broker, storage_root: Path
) -> None:
    lines, good, bad = mixed_lines(10)
    root = storage_root / "sink"
    root.mkdir()
    (root / "a.jsonl").write_text("\n".join(lines) + "\n")
    sub = submitted("sink-a", {"input": str(root / "a.jsonl"), "output": str(root / "out"), "chunk_size": 4},
                    "sub-a")  # fmt: skip
    status, reply = deliver(server.url, sub)
    assert status == 200 and reply is not None and reply["type"] == "dev.evllm.batch.progress", server.tail()
    chunks = by_hand.chunks("sink-a")
    assert sorted(chunks) == [0, 1, 2, 3]
    assert all(c["subject"] == "sink-a" and c["jobid"] == "sink-a" for c in chunks.values())
    time.sleep(0.5)
    assert not (root / "out" / "sink-a" / "parts").exists()  # nothing ran in-process
    # Chunk 0 twice at the same time, then the rest with duplicates, as a broker may deliver.
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda c: deliver(server.url, c), [chunks[0], chunks[0]]))
    replies += [deliver(server.url, chunks[index]) for index in [1, 2, 3, 3, 1]]
    assert all(status == 200 and reply is not None for status, reply in replies)
    completed = [r for _, r in replies if r is not None and r["type"] == "dev.evllm.batch.completed"]
    assert len(completed) == 3 and len({r["id"] for r in completed}) == 1  # 3, then 3 and 1 again
    result = check_outputs(root / "out" / "sink-a", good, bad)
    assert completed[0]["id"] == result["event_id"]


@pytest.mark.lifecycle("crash")
def test_engine_killed_mid_chunk_fails_retryably_and_writes_nothing(
    server, by_hand: Broker, storage_root: Path
) -> None:
    sub, job = crash_job(storage_root)
    status, reply = deliver(server.url, sub)
    assert status == 200 and reply is not None and reply.data["chunks_total"] == 3, server.tail()
    chunks = by_hand.chunks(CRASH_JOB)
    assert sorted(chunks) == [0, 1, 2]
    status, reply = deliver(server.url, chunks[0])
    assert status == 200 and reply is not None and reply.data["chunks_done"] == 1
    core = engine_core_pid(server)

    # Chunk 1 is in flight when the engine dies (a broker would see the answer or the drop and retry).
    outcome: list[object] = []

    def in_flight() -> None:
        try:
            outcome.append(deliver(server.url, chunks[1]))
        except httpx.HTTPError as exc:
            outcome.append(exc)

    before = generated_tokens(server.url)
    thread = threading.Thread(target=in_flight)
    thread.start()
    # Kill once the engine is generating for chunk 1 (not after a fixed sleep: machines differ).
    deadline = time.monotonic() + 60
    while generated_tokens(server.url) <= before:
        assert time.monotonic() < deadline, "chunk 1 never started generating"
        time.sleep(0.05)
    part1 = job / "parts" / "chunk-000001.jsonl"
    assert not part1.exists(), "chunk 1 finished before the kill: make it heavier"
    os.kill(core, signal.SIGKILL)
    thread.join(120)
    assert not thread.is_alive() and len(outcome) == 1
    (result,) = outcome
    # Never 200 (lines recorded as failed) or 400 (dead-lettered): the delivery must be retried.
    assert isinstance(result, httpx.HTTPError) or 500 <= result[0] < 600, result

    # The replica says it is dead (the kubelet restarts it) and refuses new work with a JSON 503.
    deadline = time.monotonic() + 30
    while (live := httpx.get(server.url + "/v2/health/live", timeout=10)).status_code != 503:
        assert time.monotonic() < deadline, live.text
        time.sleep(0.5)
    resp = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/generate",
                      json={"text_input": "Hello", "parameters": {"max_tokens": 2}}, timeout=30)  # fmt: skip
    assert resp.status_code == 503 and resp.json()["error"], resp.text
    assert not part1.exists() and not (job / "result.json").exists()
    assert (job / "parts" / "chunk-000000.jsonl").exists()
    server.kill()  # the kubelet's restart: the `restarted` fixture starts the replacement


@pytest.mark.lifecycle("restarted")
def test_redelivery_after_the_restart_completes_exactly_once(
    restarted, by_hand: Broker, storage_root: Path
) -> None:
    sub, job = crash_job(storage_root)
    parts = job / "parts"
    assert (parts / "chunk-000000.jsonl").exists() and not (parts / "chunk-000001.jsonl").exists(), (
        "the crash test leaves chunk 0 done and chunk 1 missing"
    )
    auth = {"Authorization": f"Bearer {API_KEY}"}
    assert deliver(restarted.url, sub)[0] == 401  # a Trigger must now send credentials
    emitted = by_hand.chunks(CRASH_JOB)

    # The submitted event again: only the missing chunks are emitted, under the same event ids (the broker
    # and consumers dedup on source + id).
    before = len(by_hand.events)
    status, reply = deliver(restarted.url, sub, headers=auth)
    assert status == 200 and reply is not None and reply["type"] == "dev.evllm.batch.progress"
    assert reply.data["chunks_done"] == 1
    again = [e for e in by_hand.events[before:] if e["type"] == "dev.evllm.batch.chunk"]
    assert sorted(e.data["chunk"] for e in again) == [1, 2]
    assert {e["id"] for e in again} == {emitted[1]["id"], emitted[2]["id"]}

    # Every chunk event, duplicates included: chunk 1 twice at once, chunk 0 (done before the crash) ...
    with ThreadPoolExecutor(2) as pool:
        replies = list(pool.map(lambda c: deliver(restarted.url, c, headers=auth), [emitted[1], emitted[1]]))
    replies += [deliver(restarted.url, emitted[i], headers=auth) for i in (0, 2, 1)]
    replies.append(deliver(restarted.url, sub, headers=auth))
    assert all(status == 200 and reply is not None for status, reply in replies), replies
    kinds = [r["type"].rsplit(".", 1)[1] for _, r in replies if r is not None]
    assert kinds == ["progress", "progress", "progress", "completed", "completed", "completed"]
    completed = {r["id"] for _, r in replies if r is not None and r["type"] == "dev.evllm.batch.completed"}
    # Chunk 0's lines were not run again: their records are the first replica's (900 tokens each). The
    # restarted replica refuses max_tokens above its --max_tokens_limit (conftest.MAX_TOKENS_LIMIT), as it
    # would on HTTP: the other lines are in the error file, each exactly once, with that 400.
    result = check_outputs(job, {f"k-{i}" for i in range(HEAVY_CHUNK)}, HEAVY_LINES - HEAVY_CHUNK)
    assert completed == {result["event_id"]}
    tokens = {r["custom_id"]: r["response"]["body"]["usage"]["completion_tokens"]
              for r in read_jsonl(job / "output.jsonl")}  # fmt: skip
    assert set(tokens.values()) == {HEAVY_TOKENS}
    errors = read_jsonl(job / "errors.jsonl")
    assert sorted(r["custom_id"] for r in errors) == sorted(f"k-{i}" for i in range(HEAVY_CHUNK, HEAVY_LINES))
    assert {r["error"]["message"] for r in errors} == {
        f"max_tokens={HEAVY_TOKENS} is above the limit of {MAX_TOKENS_LIMIT}"
    }

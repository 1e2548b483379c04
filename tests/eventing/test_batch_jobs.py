"""Batch jobs with an engine-free data plane: local mode (no K_SINK: two chunks at a time, waiting for the
engine, resuming after a failed chunk), sink mode, chunking, exactly-once parts and completion."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from eventing import chunk, cli
from eventing.batch import JobFiles, Manifest

from .batchdata import check_outputs, completion_line, mixed_lines
from .fakes import FakeDataPlane, events_client

SUBMITTED = "dev.evllm.batch.submitted"


def submitted(data: dict[str, Any], id_: str = "sub-1") -> tuple[dict[str, str], bytes]:
    return to_binary(CloudEvent({"type": SUBMITTED, "source": "/tests", "id": id_, "model": "demo"}, data))


async def post(client, headers_body) -> tuple[int, CloudEvent | dict]:
    headers, body = headers_body
    resp = await client.post("/events", headers=headers, content=body)
    if resp.status_code == 200:
        return 200, from_http(dict(resp.headers), resp.content)
    return resp.status_code, resp.json() if resp.content else {}


async def wait_local_jobs(client) -> None:
    await asyncio.gather(*list(client.handlers._local_jobs.values()))


def write_input(root: Path, lines: list[str]) -> Path:
    path = root / "in" / "batch.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    return path


def test_local_job_end_to_end(tmp_path: Path) -> None:
    lines, good, bad = mixed_lines(10)
    inp = write_input(tmp_path, lines)

    async def main() -> None:
        dp = FakeDataPlane()
        async with events_client(dp, tmp_path) as client:
            data = {
                "job_id": "job1",
                "input": f"file://{inp}",
                "output": str(tmp_path / "out"),
                "chunk_size": 4,
            }
            status, reply = await post(client, submitted(data))
            assert status == 200 and reply["type"] == "dev.evllm.batch.progress"
            assert reply.data["chunks_total"] == 4 and reply["jobid"] == "job1"
            await wait_local_jobs(client)
            # Batch lines run below online traffic.
            assert {p for _, _, p in dp.calls} == {10}
            # Redelivering the submitted event after completion answers with the one completed event.
            status, again = await post(client, submitted(data, id_="sub-2"))
            assert again["type"] == "dev.evllm.batch.completed"
            status, third = await post(client, submitted(data, id_="sub-3"))
            assert third["id"] == again["id"]
            assert again.data["request_counts"] == {"total": 15, "completed": 10, "failed": 5}
        # 10 good lines + the one the OpenAI layer rejects (max_tokens=-5); the other bad lines and the
        # duplicate custom_id never reach the engine, and nothing ran twice.
        assert len(dp.calls) == 11

    asyncio.run(main())
    check_outputs(tmp_path / "out" / "job1", good, bad)


class SlowLastLine(FakeDataPlane):
    """Records which prompts are in flight when each call starts; prompt "slow" takes 0.3 s."""

    def __init__(self) -> None:
        super().__init__()
        self.running: set[str] = set()
        self.seen_with: dict[str, set[str]] = {}

    async def openai_call(self, url: str, body: Any, *, priority: int = 0) -> tuple[int, dict[str, Any]]:
        prompt = body["prompt"]
        self.seen_with[prompt] = set(self.running)
        self.running.add(prompt)
        self.delay = 0.3 if prompt == "slow" else 0.01
        try:
            return await super().openai_call(url, body, priority=priority)
        finally:
            self.running.discard(prompt)


def test_local_job_overlaps_chunks_and_reads_its_input_once(tmp_path: Path, monkeypatch) -> None:
    # Chunk a ends with a slow line: a later chunk starts beside it instead of waiting for it to drain.
    prompts = ["a0", "a1", "a2", "slow", "b0", "b1", "b2", "b3", "c0", "c1"]
    inp = write_input(tmp_path, [json.dumps(completion_line(f"id-{p}", p)) for p in prompts])
    reads: list[str] = []
    read_bytes = chunk.read_bytes
    monkeypatch.setattr(chunk, "read_bytes", lambda loc: reads.append(loc.uri) or read_bytes(loc))

    async def main() -> None:
        dp = SlowLastLine()
        async with events_client(dp, tmp_path) as client:
            data = {
                "job_id": "ov",
                "input": f"file://{inp}",
                "output": str(tmp_path / "out"),
                "chunk_size": 4,
            }
            status, _ = await post(client, submitted(data))
            assert status == 200
            await wait_local_jobs(client)
            status, done = await post(client, submitted(data, id_="again"))
            assert done["type"] == "dev.evllm.batch.completed"
            assert done.data["request_counts"] == {"total": 10, "completed": 10, "failed": 0}
        assert sorted(body["prompt"] for _, body, _ in dp.calls) == sorted(prompts)
        # Chunks a and b start together; b finishes quickly and c starts while "slow" still runs (one
        # chunk at a time, c would wait for a's last line).
        assert "slow" in dp.seen_with["c0"] and "slow" in dp.seen_with["c1"]
        # (Either may start first: each reads its own state in a worker thread.)
        assert any(p.startswith("a") for p in dp.seen_with["b3"]) or any(
            p.startswith("b") for p in dp.seen_with["slow"]
        )
        # Never more than two chunks at once.
        chunk_of = {p: i // 4 for i, p in enumerate(prompts)}
        assert max(len({chunk_of[p] for p in {q, *seen}}) for q, seen in dp.seen_with.items()) == 2

    asyncio.run(main())
    inputs = [u for u in reads if u.endswith("/ov/input.jsonl")]
    assert len(inputs) == 1, reads


def test_local_job_resumes_after_a_failed_chunk(tmp_path: Path, monkeypatch) -> None:
    """A chunk that fails for good (here: its part file cannot be written) stops the local run; the
    job stays incomplete until batch.submitted is delivered again, which runs only the missing chunks."""
    prompts = [f"p{i}" for i in range(12)]
    inp = write_input(tmp_path, [json.dumps(completion_line(f"id-{p}", p)) for p in prompts])
    write_atomic = chunk.write_atomic
    broken = {"chunk-000001.jsonl"}

    def flaky_write(loc, data: bytes) -> None:
        name = loc.path.rsplit("/", 1)[-1]
        if name in broken:
            broken.discard(name)
            raise OSError(28, "No space left on device")
        write_atomic(loc, data)

    monkeypatch.setattr(chunk, "write_atomic", flaky_write)
    job = tmp_path / "out" / "rs"

    async def main() -> None:
        dp = FakeDataPlane()
        async with events_client(dp, tmp_path) as client:
            data = {"job_id": "rs", "input": str(inp), "output": str(tmp_path / "out"), "chunk_size": 4}
            assert (await post(client, submitted(data)))[1]["type"] == "dev.evllm.batch.progress"
            await wait_local_jobs(client)
            assert not broken and not (job / "result.json").exists()
            assert not (job / "parts" / "chunk-000001.jsonl").exists()
            assert (job / "parts" / "chunk-000000.jsonl").exists()
            assert cli.job_status(str(tmp_path / "out"), "rs")["state"] == "in_progress"
            status, progress = await post(client, submitted(data, id_="resume"))
            assert status == 200 and progress["type"] == "dev.evllm.batch.progress"
            assert progress.data["chunks_done"] >= 1
            await wait_local_jobs(client)
            status, done = await post(client, submitted(data, id_="after"))
            assert status == 200 and done["type"] == "dev.evllm.batch.completed"
            assert done.data["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
        # Chunk 1's lines ran twice (its first result was never written); every other line once.
        ran = sorted(body["prompt"] for _, body, _ in dp.calls)
        assert ran == sorted(prompts + prompts[4:8])

    asyncio.run(main())
    check_outputs(job, {f"id-{p}" for p in prompts}, 0)


def test_local_job_waits_for_the_engine_and_retries_the_chunk(tmp_path: Path) -> None:
    """Engine not ready (starting, restarting): the local run retries the chunk with backoff instead of
    failing it; the job completes once the engine is back."""
    from prometheus_client import REGISTRY

    from predictors import metrics

    def retried() -> float:
        labels = {"model": metrics.model(), "outcome": "retried"}
        return REGISTRY.get_sample_value("evllm_batch_chunks_total", labels) or 0.0

    async def main() -> None:
        dp = FakeDataPlane()
        dp.ready = False
        before = retried()
        async with events_client(dp, tmp_path) as client:
            lines = [completion_line(f"c{i}", f"hi {i}") for i in range(3)]
            data = {"job_id": "wait", "input": lines, "output": str(tmp_path / "o")}
            assert (await post(client, submitted(data)))[1]["type"] == "dev.evllm.batch.progress"
            await asyncio.sleep(0.2)
            assert retried() > before and dp.calls == []
            dp.ready = True
            await wait_local_jobs(client)
        assert len(dp.calls) == 3
        result = json.loads((tmp_path / "o" / "wait" / "result.json").read_text())
        assert result["request_counts"] == {"total": 3, "completed": 3, "failed": 0}

    asyncio.run(main())


def test_bad_jobs_reply_batch_failed(tmp_path: Path) -> None:
    outside = tmp_path.parent / "elsewhere.jsonl"
    cases = [
        (
            {"job_id": "j", "input": str(tmp_path / "missing.jsonl"), "output": str(tmp_path)},
            "does not exist",
        ),
        (
            {"job_id": "j", "input": str(outside), "output": str(tmp_path)},
            "outside the configured storage roots",
        ),
        ({"job_id": "j", "input": f"{tmp_path}/../x.jsonl", "output": str(tmp_path)}, "'..' is not allowed"),
        ({"job_id": "j", "input": [{"custom_id": "a"}], "output": "/etc"}, "outside"),
        ({"job_id": "../j", "input": [{"custom_id": "a"}], "output": str(tmp_path)}, "job_id"),
        ({"input": [{"custom_id": "a"}], "output": str(tmp_path)}, "job_id"),
        ({"job_id": "j", "input": [{"a": 1}], "output": str(tmp_path), "chunk_size": 0}, "chunk_size"),
        ({"job_id": "j", "input": [{"a": 1}], "output": str(tmp_path), "deadline": "soon"}, "deadline"),
        ({"job_id": "j", "input": "simplecache::file:///etc/passwd", "output": str(tmp_path)}, "chained"),
        ({"job_id": "j", "input": "ftp://host/x", "output": str(tmp_path)}, "unsupported storage scheme"),
    ]

    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path) as client:
            for i, (data, fragment) in enumerate(cases):
                status, reply = await post(client, submitted(data, id_=f"bad-{i}"))
                assert status == 200 and reply["type"] == "dev.evllm.batch.failed", data
                assert fragment in reply.data["error"], (fragment, reply.data)
            # The same job id with a different input is refused rather than mixed.
            ok = {"job_id": "same", "input": [{"custom_id": "a"}], "output": str(tmp_path / "o")}
            assert (await post(client, submitted(ok, id_="s1")))[1]["type"] == "dev.evllm.batch.progress"
            await wait_local_jobs(client)
            other = {**ok, "input": [{"custom_id": "b"}]}
            status, reply = await post(client, submitted(other, id_="s2"))
            assert reply["type"] == "dev.evllm.batch.failed" and "different input" in reply.data["error"]

    asyncio.run(main())


class RecordingSink:
    def __init__(self) -> None:
        self.events: list[CloudEvent] = []
        self.url = "http://sink.test"

    async def send(self, events) -> None:
        self.events.extend(events)

    async def close(self) -> None:
        return None


def test_sink_mode_chunks_are_events_and_duplicates_do_not_duplicate(tmp_path: Path) -> None:
    lines, good, bad = mixed_lines(9)
    inp = write_input(tmp_path, lines)

    async def main() -> None:
        dp = FakeDataPlane(delay=0.01)
        async with events_client(dp, tmp_path) as client:
            sink = RecordingSink()
            client.handlers.sink = sink
            data = {"job_id": "sj", "input": str(inp), "output": str(tmp_path / "out"), "chunk_size": 5}
            status, reply = await post(client, submitted(data))
            assert status == 200 and reply["type"] == "dev.evllm.batch.progress"
            assert not client.handlers._local_jobs
            chunks = list(sink.events)
            assert [c.data["chunk"] for c in chunks] == [0, 1, 2]
            assert all(c["type"] == "dev.evllm.batch.chunk" and c["model"] == "demo" for c in chunks)
            # The same submitted event again: chunk events carry the same ids (broker-side dedup).
            await post(client, submitted(data))
            assert [c["id"] for c in sink.events[3:]] == [c["id"] for c in chunks]
            replies = []
            # Chunk 0 twice at the same time, then the rest, then everything again.
            deliveries = [chunks[0], chunks[0], chunks[1], chunks[2], *chunks]
            first = await asyncio.gather(*(post(client, to_binary(c)) for c in deliveries[:2]))
            replies.extend(first)
            for c in deliveries[2:]:
                replies.append(await post(client, to_binary(c)))
            assert all(status == 200 for status, _ in replies)
            completed = [r for _, r in replies if r["type"] == "dev.evllm.batch.completed"]
            assert (
                len({c["id"] for c in completed}) == 1 and len(completed) == 4
            )  # last chunk + 3 redeliveries
            assert completed[0].data["request_counts"]["completed"] == len(good)

    asyncio.run(main())
    check_outputs(tmp_path / "out" / "sj", good, bad)


def test_crash_points_complete_exactly_once(tmp_path: Path) -> None:
    """Simulate the crash points of chunk.py's docstring on the files themselves."""
    lines, good, bad = mixed_lines(7)

    async def main() -> None:
        dp = FakeDataPlane()
        async with events_client(dp, tmp_path) as client:
            client.handlers.sink = RecordingSink()
            data = {"job_id": "cj", "input": [json.loads(x) if x.startswith("{\"") else x for x in lines],
                    "output": str(tmp_path / "out"), "chunk_size": 3}  # fmt: skip
            await post(client, submitted(data))
            chunks = client.handlers.sink.events
            job = tmp_path / "out" / "cj"
            # Crash mid-chunk: only a temp file was left behind; the part does not exist.
            (job / "parts").mkdir(exist_ok=True)
            (job / "parts" / ".tmp-crash.part").write_text("{garbage")
            for c in chunks:
                await post(client, to_binary(c))
            result = json.loads((job / "result.json").read_text())
            calls = len(dp.calls)
            # Crash during the merge: output written, result.json not; redelivery re-merges identically.
            (job / "result.json").unlink()
            (job / "output.jsonl").write_text("torn")
            status, reply = await post(client, to_binary(chunks[0]))
            assert reply["type"] == "dev.evllm.batch.completed" and reply["id"] == result["event_id"]
            assert len(dp.calls) == calls  # no chunk ran again
            # Crash after a part write, before the completion check, on the last chunk.
            (job / "result.json").unlink()
            status, reply = await post(client, to_binary(chunks[-1]))
            assert status == 200 and reply["type"] == "dev.evllm.batch.completed"
            assert reply["id"] == result["event_id"]

    asyncio.run(main())
    check_outputs(tmp_path / "out" / "cj", good, bad)


def test_chunk_event_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path) as client:
            base = {"type": "dev.evllm.batch.chunk", "source": "/t", "id": "c"}
            for data, fragment in [
                ({"job_id": "nope", "output": str(tmp_path), "chunk": 0}, "unknown job"),
                ({"job_id": "nope", "output": "/etc", "chunk": 0}, "outside"),
                ({"job_id": "nope", "output": str(tmp_path)}, "chunk"),
            ]:
                status, body = await post(client, to_binary(CloudEvent(base, data)))
                assert status == 400 and fragment in body["error"]

    asyncio.run(main())


def test_expired_job_fails_its_lines_but_completes(tmp_path: Path) -> None:
    async def main() -> None:
        dp = FakeDataPlane()
        async with events_client(dp, tmp_path) as client:
            data = {"job_id": "late", "input": [{"custom_id": "a", "url": "/v1/completions",
                    "body": {"prompt": "x"}}], "output": str(tmp_path / "o"),
                    "deadline": "2000-01-01T00:00:00Z"}  # fmt: skip
            await post(client, submitted(data))
            await wait_local_jobs(client)
            assert dp.calls == []
        errs = (tmp_path / "o" / "late" / "errors.jsonl").read_text()
        assert json.loads(errs)["error"]["code"] == "expired"

    asyncio.run(main())


def test_engine_not_ready_chunk_is_503(tmp_path: Path) -> None:
    async def main() -> None:
        dp = FakeDataPlane()
        async with events_client(dp, tmp_path) as client:
            client.handlers.sink = RecordingSink()
            data = {"job_id": "nr", "input": [{"custom_id": "a", "url": "/v1/completions", "body": {"prompt": "x"}}],
                    "output": str(tmp_path / "o")}  # fmt: skip
            await post(client, submitted(data))
            dp.ready = False
            status, _ = await post(client, to_binary(client.handlers.sink.events[0]))
            assert status == 503
            assert not (tmp_path / "o" / "nr" / "parts" / "chunk-000000.jsonl").exists()

    asyncio.run(main())


def test_manifest_chunk_ranges() -> None:
    m = Manifest("j", "inline", "/o", 4, 10, 3, "x")
    assert [list(m.chunk_range(i)) for i in range(3)] == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    with pytest.raises(ValueError):
        asyncio.run(chunk.run_chunk(None, JobFiles.__new__(JobFiles), m, 3))  # type: ignore[arg-type]


def test_job_over_the_line_limit_fails(tmp_path: Path) -> None:
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions", "body": {}} for i in range(3)]

    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path, max_batch_lines=2) as client:
            data = {"job_id": "big", "input": lines, "output": str(tmp_path / "o")}
            status, reply = await post(client, submitted(data, id_="big-1"))
            assert status == 200 and reply["type"] == "dev.evllm.batch.failed"
            assert "3 lines; the limit is 2 per job" in reply.data["error"]
            assert not (tmp_path / "o" / "big").exists()
            ok = {"job_id": "small", "input": lines[:2], "output": str(tmp_path / "o")}
            assert (await post(client, submitted(ok, id_="small-1")))[1]["type"] == "dev.evllm.batch.progress"
            await wait_local_jobs(client)

    asyncio.run(main())


def test_sink_mode_counts_are_linear_and_exact_under_redelivery(tmp_path: Path, monkeypatch) -> None:
    """Each chunk reply carries the job's counts without re-reading every part written so far: part reads
    stay O(chunks) for the whole job (they were O(chunks^2)), and a redelivered chunk is not counted
    twice, even when counts.json lost an update (two replicas writing it at once)."""
    part_reads: list[str] = []
    records = chunk._records
    monkeypatch.setattr(chunk, "_records", lambda files, i: part_reads.append(i) or records(files, i))
    chunks = 40

    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path) as client:
            client.handlers.sink = RecordingSink()
            lines = [completion_line(f"c{i}", "bad" if i % 5 == 0 else f"p{i}") for i in range(chunks * 2)]
            data = {"job_id": "lin", "input": lines, "output": str(tmp_path / "o"), "chunk_size": 2}
            await post(client, submitted(data))
            events = list(client.handlers.sink.events)
            assert len(events) == chunks
            replies = []
            for n, ev in enumerate(events[:-1]):
                if n == 10:  # a lost update: counts.json without chunk 9's entry
                    counts = json.loads((tmp_path / "o" / "lin" / "counts.json").read_text())
                    del counts["chunks"]["9"]
                    (tmp_path / "o" / "lin" / "counts.json").write_text(json.dumps(counts))
                status, reply = await post(client, to_binary(ev))
                assert status == 200
                replies.append(reply.data["request_counts"])
                # Redelivered: same counts, nothing counted twice.
                status, again = await post(client, to_binary(ev))
                assert again.data["request_counts"] == reply.data["request_counts"]
            done = 2 * (chunks - 1)  # lines in the chunks delivered so far; every 5th is "bad" (a 400)
            failed = len([i for i in range(done) if i % 5 == 0])
            assert replies[-1] == {"total": 2 * chunks, "completed": done - failed, "failed": failed}
            # Only the part whose counts.json entry was lost was read back; none for the others.
            assert part_reads == [9]
            status, final = await post(client, to_binary(events[-1]))
            assert final["type"] == "dev.evllm.batch.completed"
            assert final.data["request_counts"]["failed"] == 16

    asyncio.run(main())

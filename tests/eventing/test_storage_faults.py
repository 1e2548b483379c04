"""Storage faults are not bad requests: batch jobs over a real S3 API (moto's server) behind a proxy
that fails requests (tests/eventing/s3server.py), on the assembled server over a fake engine.

* K_SINK mode, half the storage requests failing (503s, dropped connections, slow answers): the job
  completes, every custom_id exactly once, no chunk delivery ends in anything but 200 (none would be
  dead-lettered);
* an outage longer than every retry: a batch.chunk gets 503 (Knative redelivers it), not 400, and the
  job completes when it is delivered again after the outage;
* local mode (no K_SINK): an outage pauses the job, which finishes by itself afterwards;
* a missing input object or bucket: batch.failed with a clear message.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import threading
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import fsspec
import httpx
import pytest
import uvicorn
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http
from fsspec.implementations.memory import MemoryFileSystem

from eventing.extension import Eventing
from eventing.storage import (
    Location,
    Retry,
    Storage,
    StorageError,
    StorageForbidden,
    StorageNotFound,
    StorageUnavailable,
    exists,
    listdir,
    read_bytes,
    write_atomic,
)
from tests import inprocess
from tests.conftest import Broker, deliver

from .batchdata import completion_line
from .conftest import BUCKET, S3
from .s3server import SHORT_READ_TIMEOUT, FaultyProxy, s3_options

RETRY_SECONDS = "1"  # --storage_retry_seconds in these tests (production default: 30)


# Classification, without a server ------------------------------------------------------------------
class Flaky(MemoryFileSystem):
    """A memory filesystem whose next ``failures`` calls to info/pipe_file/ls raise ``error``."""

    store: dict[str, Any] = {}  # its own, not memory://'s
    pseudo_dirs = [""]
    cachable = False

    def __init__(self, error: BaseException, failures: int = 10**6) -> None:
        super().__init__()
        self.error, self.failures, self.calls = error, failures, 0

    def _maybe_fail(self) -> None:
        self.calls += 1
        if self.failures > 0:
            self.failures -= 1
            raise self.error

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        self._maybe_fail()
        return dict(super().info(path, **kwargs))

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> Any:
        self._maybe_fail()
        return super().ls(path, detail=detail, **kwargs)

    def pipe_file(self, path: str, value: bytes, **kwargs: Any) -> None:
        self._maybe_fail()
        super().pipe_file(path, value, **kwargs)


def flaky(error: BaseException, failures: int = 10**6, seconds: float = 0.0) -> Location:
    fs = Flaky(error, failures)
    fs.store.clear()
    return Location(fs, "/job/part.jsonl", "memory://job/part.jsonl", local=False, retry=Retry(seconds))


class HTTPStatusError(Exception):
    """An HTTP-based fsspec client's error (aiohttp's ClientResponseError, gcsfs's HttpError)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"{status}, message='answered {status}'")
        self.status = status


@pytest.mark.parametrize(
    ("error", "kind", "fragment"),
    [
        (TimeoutError("read timed out"), StorageUnavailable, "storage unavailable"),
        (ConnectionResetError("reset by peer"), StorageUnavailable, "storage unavailable"),
        (OSError(errno.EBUSY, "Service Unavailable"), StorageUnavailable, "Service Unavailable"),  # s3fs 503
        (OSError(errno.EIO, "InternalError"), StorageUnavailable, "InternalError"),
        (RuntimeError("some client's own exception"), StorageUnavailable, "RuntimeError"),
        (PermissionError("AccessDenied"), StorageForbidden, "access denied"),
        (OSError(errno.EINVAL, "InvalidBucketName"), StorageError, "InvalidBucketName"),
        (ValueError("bad path"), StorageError, "bad path"),
        (HTTPStatusError(403), StorageForbidden, "access denied (403"),
        (HTTPStatusError(404), StorageNotFound, "does not exist"),
        (HTTPStatusError(400), StorageError, "400"),
        (HTTPStatusError(429), StorageUnavailable, "429"),
        (HTTPStatusError(503), StorageUnavailable, "503"),
    ],
)
def test_faults_are_classified(error: BaseException, kind: type, fragment: str) -> None:
    loc = flaky(error)
    with pytest.raises(kind) as info:
        exists(loc)
    assert type(info.value) is kind and fragment in info.value.message
    assert int(info.value.status) == (503 if kind is StorageUnavailable else 400)


def test_exists_never_answers_false_for_a_fault() -> None:
    assert exists(flaky(FileNotFoundError(), failures=0)) is False
    with pytest.raises(StorageUnavailable):
        exists(flaky(OSError(errno.EBUSY, "SlowDown")))
    with pytest.raises(StorageNotFound, match="does not exist"):
        read_bytes(flaky(FileNotFoundError(), failures=0))


def test_transient_faults_are_retried_within_the_budget() -> None:
    loc = flaky(ConnectionResetError("reset"), failures=3, seconds=5)
    write_atomic(loc, b"data\n")  # three faults, then it goes through
    assert loc.fs.calls == 4 and loc.fs.cat_file(loc.path) == b"data\n"
    loc = flaky(ConnectionResetError("reset"), seconds=0.3)
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match=r"after \d+ attempts in 0.3s"):
        listdir(loc)
    assert 0.25 < time.monotonic() - started < 2 and loc.fs.calls >= 2
    permanent = flaky(PermissionError("denied"), seconds=5)
    with pytest.raises(StorageForbidden):
        exists(permanent)
    assert permanent.fs.calls == 1  # never retried


# The server under test ----------------------------------------------------------------------------
class Trigger(Broker):
    """tests/conftest.py's broker, also keeping what a Knative Trigger would: each chunk delivery's
    statuses (a final status other than 200 means the chunk is dead-lettered) and the replies."""

    def __init__(self) -> None:
        super().__init__()
        self.statuses: dict[str, list[int]] = {}
        self.replies: list[CloudEvent] = []

    def _deliver(self, event: CloudEvent) -> None:
        for _ in range(100):
            try:
                status, reply = deliver(str(self.target), event, timeout=60)
            except httpx.HTTPError:
                status, reply = 503, None
            with self.lock:
                self.statuses.setdefault(event["id"], []).append(status)
                if reply is not None:
                    self.replies.append(reply)
            if status not in (429, 502, 503, 504):
                return
            threading.Event().wait(0.2)

    def completed(self, job_id: str) -> CloudEvent | None:
        with self.lock:
            done = [r for r in self.replies if r["type"].endswith(".batch.completed")]
        return next((r for r in done if r.data["job_id"] == job_id), None)


@contextlib.asynccontextmanager
async def served(
    root: Path, *argv: str, delay: float = 0.0
) -> AsyncIterator[tuple[inprocess.InProcess, str]]:
    """The assembled server over a fake engine (``delay`` seconds a token), also on a real localhost
    port (for the broker)."""
    argv = ("--storage_roots", str(root), "--storage_retry_seconds", RETRY_SECONDS, *argv)
    async with inprocess.server(argv, extensions=[Eventing()], delay=delay) as s:
        config = uvicorn.Config(s.app, host="127.0.0.1", port=0, lifespan="off", log_level="warning")
        server = uvicorn.Server(config)
        task = asyncio.ensure_future(server.serve())
        while not server.started:
            assert not task.done(), "uvicorn did not start"
            await asyncio.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        try:
            yield s, f"http://127.0.0.1:{port}"
        finally:
            server.should_exit = True
            await task


def write_input(s3: S3, key: str, lines: int) -> set[str]:
    ids = {f"line-{i}" for i in range(lines)}
    body = "".join(json.dumps(completion_line(cid, f"hello {cid}")) + "\n" for cid in sorted(ids))
    s3.fs().pipe_file(f"{BUCKET}/{key}", body.encode())
    return ids


def submitted(job_id: str, input_: str, output: str, chunk_size: int = 4) -> CloudEvent:
    data = {"job_id": job_id, "input": input_, "output": output, "chunk_size": chunk_size}
    return CloudEvent({"type": "dev.evllm.batch.submitted", "source": "/tests/s3", "id": job_id}, data)


async def post(client: httpx.AsyncClient, event: CloudEvent) -> tuple[int, CloudEvent | dict[str, Any]]:
    headers, body = to_binary(event)
    resp = await client.post("/events", headers=headers, content=body)
    if resp.status_code == 200:
        return 200, from_http(dict(resp.headers), resp.content)
    return resp.status_code, resp.json()


async def post_until_accepted(client: httpx.AsyncClient, event: CloudEvent) -> tuple[CloudEvent, int]:
    """Deliver like a Trigger: 503s are retried. Returns the reply and how many 503s came first."""
    for unavailable in range(100):
        status, reply = await post(client, event)
        if status != 503:
            assert status == 200, reply
            assert isinstance(reply, CloudEvent)
            return reply, unavailable
        await asyncio.sleep(0.2)
    raise AssertionError("still 503 after 100 deliveries")


def outputs(s3: S3, job_dir: str) -> tuple[list[str], list[str], dict[str, Any]]:
    fs = s3.fs()

    def ids(name: str) -> list[str]:
        raw = fs.cat_file(f"{job_dir}/{name}").decode()
        return [json.loads(line)["custom_id"] for line in raw.splitlines() if line.strip()]

    return ids("output.jsonl"), ids("errors.jsonl"), json.loads(fs.cat_file(f"{job_dir}/result.json"))


# K_SINK mode -----------------------------------------------------------------------------------------
@pytest.fixture
def trigger(monkeypatch: pytest.MonkeyPatch) -> Iterator[Trigger]:
    t = Trigger()
    t.thread.start()
    monkeypatch.setenv("K_SINK", t.url)
    yield t
    t.server.shutdown()
    t.server.server_close()


def test_job_over_s3_survives_half_the_requests_failing(
    s3: S3, proxy: FaultyProxy, trigger: Trigger, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = write_input(s3, "in/half.jsonl", 12)
    # A short read timeout, or each slow answer would hold a request for seconds.
    monkeypatch.setitem(fsspec.config.conf, "s3", s3_options(proxy.url, read_timeout=SHORT_READ_TIMEOUT))

    async def main() -> tuple[CloudEvent, int, float]:
        async with served(tmp_path) as (s, url), s.client() as c:
            trigger.target = url
            # Half the requests fail: 503s and dropped connections, and a few slow answers (each costs a
            # client timeout, so fewer of them keep the test short).
            proxy.fraction, proxy.faults = 0.5, ("503", "503", "drop", "drop", "slow")
            started = time.monotonic()
            event = submitted("half", f"s3://{BUCKET}/in/half.jsonl", f"s3://{BUCKET}/out")
            accepted, unavailable = await post_until_accepted(c, event)
            # A 503 after the chunks went out (e.g. while reading the progress back) is delivered again,
            # and by then the job may be done: the redelivery then answers batch.completed.
            assert accepted["type"] in {"dev.evllm.batch.progress", "dev.evllm.batch.completed"}
            assert accepted.data.get("chunks_total") == 3 or accepted.data["request_counts"]["total"] == 12
            while trigger.completed("half") is None:
                assert time.monotonic() - started < 120, trigger.statuses
                await asyncio.sleep(0.1)
            elapsed = time.monotonic() - started
            proxy.fraction = 0.0
            return trigger.completed("half"), unavailable, elapsed  # type: ignore[return-value]

    done, unavailable, elapsed = asyncio.run(main())
    assert done.data["request_counts"] == {"total": 12, "completed": 12, "failed": 0}
    good, bad, result = outputs(s3, f"{BUCKET}/out/half")
    assert sorted(good) == sorted(ids) and bad == []  # every custom_id exactly once
    assert result["request_counts"]["completed"] == 12
    chunk_ids = {e["id"] for e in trigger.of_type(".batch.chunk")}
    assert len(chunk_ids) == 3
    # No delivery was answered with a status Knative does not retry: nothing was dead-lettered.
    assert all(trigger.statuses[i][-1] == 200 for i in chunk_ids)
    assert all(set(trigger.statuses[i]) <= {200, 503} for i in chunk_ids)
    counts = proxy.counts
    failed = counts["requests"] - counts["forwarded"]
    assert counts["requests"] > 50 and 0.35 < failed / counts["requests"] < 0.65
    chunk_503s = sum(s.count(503) for i, s in trigger.statuses.items() if i in chunk_ids)
    print(
        f"\nfault injection: fraction 0.5, {failed} of {counts['requests']} S3 requests failed "
        f"({counts['503']} x 503, {counts['drop'] + counts['drop-after']} dropped, {counts['slow']} slow); "
        f"submitted got {unavailable} x 503, chunk deliveries {chunk_503s} x 503 and "
        f"{sum(len(trigger.statuses[i]) for i in chunk_ids)} in all; completed 12/12 in {elapsed:.1f}s"
    )


def test_outage_longer_than_the_retries_is_503_and_the_redelivered_chunk_completes(
    s3: S3, proxy: FaultyProxy, trigger: Trigger, tmp_path: Path
) -> None:
    ids = write_input(s3, "in/outage.jsonl", 8)
    trigger.forward = False  # the test delivers the chunks, as the Trigger would, before and after

    async def main() -> None:
        async with served(tmp_path) as (s, _), s.client() as c:
            status, accepted = await post(c, submitted("outage", f"s3://{BUCKET}/in/outage.jsonl",
                                                       f"s3://{BUCKET}/out"))  # fmt: skip
            assert status == 200 and isinstance(accepted, CloudEvent)
            chunks = sorted(trigger.chunks("outage").values(), key=lambda e: e.data["chunk"])
            assert len(chunks) == 2
            proxy.outage(600)
            started = time.monotonic()
            status, body = await post(c, chunks[0])
            waited = time.monotonic() - started
            # 503 (Knative redelivers), not 400 (dead-lettered, the job would never complete).
            assert status == 503, body
            assert "storage unavailable" in body["error"] and "outage/job.json" in body["error"]
            assert waited < 20
            proxy.outage(0)
            replies = [await post(c, chunk) for chunk in chunks]
            assert [status for status, _ in replies] == [200, 200]
            last = replies[-1][1]
            assert isinstance(last, CloudEvent) and last["type"] == "dev.evllm.batch.completed"
            assert last.data["request_counts"] == {"total": 8, "completed": 8, "failed": 0}
            print(f"\noutage: batch.chunk answered 503 after {waited:.1f}s; completed after redelivery")

    asyncio.run(main())
    good, bad, _ = outputs(s3, f"{BUCKET}/out/outage")
    assert sorted(good) == sorted(ids) and bad == []


# Local mode ------------------------------------------------------------------------------------------
def test_local_job_waits_out_an_outage_without_redelivery(
    s3: S3, proxy: FaultyProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("K_SINK", raising=False)
    ids = write_input(s3, "in/local.jsonl", 8)
    fs = s3.fs()

    async def main() -> None:
        async with served(tmp_path, delay=0.05) as (s, _), s.client() as c:
            event = submitted("local", f"s3://{BUCKET}/in/local.jsonl", f"s3://{BUCKET}/out")
            reply, _ = await post_until_accepted(c, event)
            assert reply["type"] == "dev.evllm.batch.progress"
            # The chunks are running (each line takes a while): their part writes meet an outage that
            # outlasts every retry of one storage operation.
            proxy.outage(4)
            started = time.monotonic()
            while not fs.exists(f"{BUCKET}/out/local/result.json"):
                fs.invalidate_cache()
                assert time.monotonic() - started < 60, "the local job did not finish after the outage"
                await asyncio.sleep(0.2)

    asyncio.run(main())
    assert proxy.counts["outage"] > 0
    good, bad, _ = outputs(s3, f"{BUCKET}/out/local")
    assert sorted(good) == sorted(ids) and bad == []


# Permanent faults ------------------------------------------------------------------------------------
def test_missing_input_object_or_bucket_fails_the_job_clearly(
    s3: S3, proxy: FaultyProxy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("K_SINK", raising=False)

    async def main() -> None:
        async with served(tmp_path) as (s, _), s.client() as c:
            for job_id, uri in [("nokey", f"s3://{BUCKET}/in/missing.jsonl"),
                                ("nobucket", "s3://no-such-bucket/in.jsonl")]:  # fmt: skip
                status, reply = await post(c, submitted(job_id, uri, f"s3://{BUCKET}/out"))
                assert status == 200 and isinstance(reply, CloudEvent)
                assert reply["type"] == "dev.evllm.batch.failed"
                assert reply.data == {"job_id": job_id, "error": f"input: {uri} does not exist"}

    asyncio.run(main())


def test_listings_see_other_replicas_writes(s3: S3, proxy: FaultyProxy) -> None:
    """s3fs caches listings; a part written by another replica must still count."""
    parts = Storage([]).resolve(f"s3://{BUCKET}/replicas/job/parts")
    assert listdir(parts) == []
    other = s3.fs()  # another process's client
    other.pipe_file(f"{BUCKET}/replicas/job/parts/chunk-000000.jsonl", b"{}\n")
    assert listdir(parts) == ["chunk-000000.jsonl"]
    assert exists(parts.child("chunk-000000.jsonl"))
    other.pipe_file(f"{BUCKET}/replicas/job/parts/chunk-000001.jsonl", b"{}\n")
    assert exists(parts.child("chunk-000001.jsonl"))
    assert listdir(parts) == ["chunk-000000.jsonl", "chunk-000001.jsonl"]


def test_a_permanent_fault_during_a_chunk_fails_the_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Access to the output revoked while the job runs: its chunk replies batch.failed (published, the
    job is over) rather than a 400 (dead-lettered, the job silently never completes)."""
    from eventing import chunk

    from .fakes import FakeDataPlane, events_client

    class Sink:
        url = "http://sink.test"

        def __init__(self) -> None:
            self.events: list[CloudEvent] = []

        async def send(self, events: Any) -> None:
            self.events.extend(events)

        async def close(self) -> None:
            return None

    def denied(loc: Location, data: bytes) -> None:
        raise StorageForbidden(f"cannot write {loc.uri}: access denied (AccessDenied)")

    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path) as client:
            client.handlers.sink = sink = Sink()
            data = {"job_id": "revoked", "input": [completion_line("a", "x")], "output": str(tmp_path / "o")}
            status, accepted = await post(client, CloudEvent(
                {"type": "dev.evllm.batch.submitted", "source": "/t", "id": "s"}, data))  # fmt: skip
            assert status == 200 and isinstance(accepted, CloudEvent)
            monkeypatch.setattr(chunk, "write_atomic", denied)
            status, reply = await post(client, sink.events[0])
            assert status == 200 and isinstance(reply, CloudEvent)
            assert reply["type"] == "dev.evllm.batch.failed" and reply["jobid"] == "revoked"
            assert reply.data["error"].startswith("storage: cannot write ")
            assert "chunk-000000.jsonl: access denied" in reply.data["error"]

    asyncio.run(main())

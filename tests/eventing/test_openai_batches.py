"""The OpenAI Files and Batches API with the official `openai` client against the assembled in-process
server (tests/inprocess.py: real middleware and eventing, fake engine through which every line runs):
upload, create, poll, download, list, cancel mid-job, two jobs at once, event jobs seen as batches, a
restart that resumes, and every bad request answered with OpenAI's error object and a 4xx."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from eventing.extension import Eventing
from tests import inprocess

from .fakes import openai_through_engine

FINISHED = ("completed", "failed", "expired", "cancelled")


def server(root: Path, *argv: str, **kwargs: Any) -> Any:
    return inprocess.server(["--storage_roots", str(root), *argv], extensions=[Eventing()], **kwargs)


def client_for(s: inprocess.InProcess) -> openai.AsyncOpenAI:
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app), base_url="http://predictor")
    return openai.AsyncOpenAI(
        api_key="unused", base_url="http://predictor/openai/v1", http_client=http, max_retries=0
    )


def jsonl(n: int, prefix: str = "r", url: str = "/v1/completions", model: str = "demo") -> bytes:
    lines = []
    for i in range(n):
        if url == "/v1/completions":
            body: dict[str, Any] = {"model": model, "prompt": f"{prefix} {i}", "max_tokens": 8}
        else:
            body = {
                "model": model,
                "messages": [{"role": "user", "content": f"{prefix} {i}"}],
                "max_tokens": 8,
            }
        lines.append(json.dumps({"custom_id": f"{prefix}-{i}", "method": "POST", "url": url, "body": body}))
    return ("\n".join(lines) + "\n").encode()


async def wait(client: openai.AsyncOpenAI, batch_id: str, timeout: float = 30.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = await client.batches.retrieve(batch_id)
        if batch.status in FINISHED:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} still {batch.status}"
        await asyncio.sleep(0.02)


async def records(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    content = await client.files.content(file_id)
    return [json.loads(line) for line in content.text.splitlines() if line.strip()]


async def submit(client: openai.AsyncOpenAI, data: bytes, **kwargs: Any) -> Any:
    f = await client.files.create(file=("input.jsonl", data, "application/jsonl"), purpose="batch")
    return await client.batches.create(
        input_file_id=f.id,
        endpoint=kwargs.pop("endpoint", "/v1/completions"),
        completion_window="24h",
        **kwargs,
    )


@contextlib.asynccontextmanager
async def running(
    root: Path, *argv: str, delay: float = 0.0
) -> AsyncIterator[tuple[Any, openai.AsyncOpenAI]]:
    async with server(root, *argv, delay=delay) as s:
        openai_through_engine(s)
        client = client_for(s)
        try:
            yield s, client
        finally:
            await client.close()


def test_full_flow_upload_create_poll_download_list(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "--batch_chunk_size", "4") as (s, client):
            f = await client.files.create(file=("in.jsonl", jsonl(10), "application/jsonl"), purpose="batch")
            assert f.object == "file" and f.purpose == "batch" and f.bytes == len(jsonl(10))
            assert (await client.files.retrieve(f.id)).filename == "in.jsonl"
            batch = await client.batches.create(
                input_file_id=f.id,
                endpoint="/v1/completions",
                completion_window="24h",
                metadata={"team": "tests"},
            )
            assert batch.object == "batch" and batch.status in ("validating", "in_progress")
            assert batch.metadata == {"team": "tests"} and batch.expires_at == batch.created_at + 86400
            done = await wait(client, batch.id)
            assert done.status == "completed"
            assert done.request_counts is not None
            assert done.request_counts.model_dump() == {"total": 10, "completed": 10, "failed": 0}
            assert done.completed_at and done.finalizing_at and done.in_progress_at
            assert done.error_file_id is None
            out = await records(client, done.output_file_id)
            assert sorted(r["custom_id"] for r in out) == sorted(f"r-{i}" for i in range(10))
            for r in out:
                assert r["response"]["status_code"] == 200 and r["error"] is None
                assert r["response"]["body"]["choices"][0]["text"] == r["custom_id"].replace("-", " ").upper()
            assert (await client.files.retrieve(done.output_file_id)).purpose == "batch_output"
            # The input file is still the user's: content, list, delete.
            assert (await client.files.content(f.id)).content == jsonl(10)
            assert f.id in [x.id async for x in client.files.list()]
            # A purpose filter still fills its page: the newer output file does not take the slot.
            page = await client.files.list(purpose="batch", limit=1)
            assert [x.id for x in page.data] == [f.id] and not page.has_more
            page = await client.files.list(purpose="batch_output", limit=1)
            assert [x.id for x in page.data] == [done.output_file_id] and not page.has_more
            deleted = await client.files.delete(f.id)
            assert deleted.deleted and deleted.id == f.id
            with pytest.raises(openai.NotFoundError):
                await client.files.retrieve(f.id)
            # Every line ran below online traffic.
            assert set(s.engine.fake.priorities) == {10}

    asyncio.run(main())


def test_list_is_newest_first_and_paginates(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path) as (_, client):
            ids = [(await submit(client, jsonl(1, prefix=f"j{i}"))).id for i in range(5)]
            page = await client.batches.list(limit=2)
            assert [b.id for b in page.data] == ids[::-1][:2] and page.has_more
            every = [b.id async for b in await client.batches.list(limit=2)]  # the client follows `after`
            assert every == ids[::-1]
            last = await client.batches.list(limit=2, after=ids[1])
            assert [b.id for b in last.data] == [ids[0]] and not last.has_more

    asyncio.run(main())


def test_files_list_in_either_order(tmp_path: Path) -> None:
    """`order`: desc (newest first, OpenAI's default) or asc; `after` and the purpose filter follow it."""

    async def main() -> None:
        async with running(tmp_path) as (_, client):
            ids = []
            for i in range(4):
                f = await client.files.create(
                    file=(f"{i}.jsonl", jsonl(1), "application/jsonl"), purpose="batch"
                )
                ids.append(f.id)
            assert [f.id for f in (await client.files.list()).data] == ids[::-1]
            page = await client.files.list(order="asc", limit=2)
            assert [f.id for f in page.data] == ids[:2] and page.has_more
            assert [f.id async for f in await client.files.list(order="asc", limit=3)] == ids
            last = await client.files.list(order="asc", after=ids[1], purpose="batch", limit=5)
            assert [f.id for f in last.data] == ids[2:] and not last.has_more
            newer = await client.files.list(order="desc", after=ids[2])
            assert [f.id for f in newer.data] == ids[1::-1]

    asyncio.run(main())


def test_cancel_mid_job_keeps_done_lines_and_aborts_the_rest(tmp_path: Path) -> None:
    async def main() -> None:
        # 24 lines of 4 tokens at 50 ms a token, 2 in flight: ~2.4 s of work.
        async with running(tmp_path, "--batch_chunk_size", "6", "--batch_max_inflight", "2",
                                       delay=0.05) as (s, client):  # fmt: skip
            batch = await submit(client, jsonl(24))
            while (await client.batches.retrieve(batch.id)).request_counts.completed < 1:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
            cancelled = await client.batches.cancel(batch.id)
            assert cancelled.status in ("cancelling", "cancelled") and cancelled.cancelling_at
            done = await wait(client, batch.id)
            assert done.status == "cancelled" and done.cancelled_at
            counts = done.request_counts
            assert counts is not None and counts.total == 24 and counts.completed + counts.failed == 24
            assert 1 <= counts.completed < 24
            out = await records(client, done.output_file_id)
            errs = await records(client, done.error_file_id)
            assert len(out) == counts.completed and len(errs) == counts.failed
            assert {r["error"]["code"] for r in errs} == {"cancelled"}
            assert sorted(r["custom_id"] for r in out + errs) == sorted(f"r-{i}" for i in range(24))
            # Lines in the engine were aborted there, and no line started after the cancel.
            assert s.engine.fake.aborted
            assert len(s.engine.fake.requests) == counts.completed + len(s.engine.fake.aborted) < 24
            # A finished batch cannot be cancelled.
            with pytest.raises(openai.ConflictError) as info:
                await client.batches.cancel(batch.id)
            assert info.value.body["code"] == "batch_not_cancellable"  # type: ignore[index]

    asyncio.run(main())


def test_two_jobs_at_once(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "--batch_chunk_size", "3", "--batch_max_inflight", "2",
                                       delay=0.002) as (_, client):  # fmt: skip
            a, b = await asyncio.gather(
                submit(client, jsonl(9, prefix="a")),
                submit(
                    client, jsonl(7, prefix="b", url="/v1/chat/completions"), endpoint="/v1/chat/completions"
                ),
            )
            da, db = await asyncio.gather(wait(client, a.id), wait(client, b.id))
            for done, prefix, n in ((da, "a", 9), (db, "b", 7)):
                assert done.status == "completed"
                out = await records(client, done.output_file_id)
                assert sorted(r["custom_id"] for r in out) == sorted(f"{prefix}-{i}" for i in range(n))

    asyncio.run(main())


def test_event_job_is_an_openai_batch(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path) as (s, client):
            inp = tmp_path / "in.jsonl"
            inp.write_bytes(jsonl(3, prefix="ev"))
            data = {"job_id": "from-event", "input": str(inp), "output": str(tmp_path / "out")}
            ev = CloudEvent({"type": "dev.evllm.batch.submitted", "source": "/t", "id": "s-1"}, data)
            headers, body = to_binary(ev)
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app), base_url="http://predictor")
            async with http:
                resp = await http.post("/events", headers=headers, content=body)
            reply = from_http(dict(resp.headers), resp.content)
            batch_id = reply.data["id"]
            assert reply.data["object"] == "batch" and batch_id.startswith("batch_")
            done = await wait(client, batch_id)
            assert done.status == "completed" and done.metadata == {
                "job_id": "from-event",
                "output": str(tmp_path / "out"),
            }
            assert len(await records(client, done.output_file_id)) == 3
            assert batch_id in [b.id async for b in await client.batches.list()]

    asyncio.run(main())


def test_cancel_event_cancels_a_batch(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "--batch_chunk_size", "2", "--batch_max_inflight", "1",
                                       delay=0.02) as (s, client):  # fmt: skip
            batch = await submit(client, jsonl(8))
            ev = CloudEvent(
                {"type": "dev.evllm.batch.cancel", "source": "/t", "id": "c-1"}, {"batch_id": batch.id}
            )
            headers, body = to_binary(ev)
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app), base_url="http://predictor")
            async with http:
                resp = await http.post("/events", headers=headers, content=body)
            reply = from_http(dict(resp.headers), resp.content)
            assert reply["type"] == "dev.evllm.batch.progress" and reply.data["status"] == "cancelling"
            done = await wait(client, batch.id)
            assert done.status == "cancelled" and done.request_counts.failed >= 1  # type: ignore[union-attr]

    asyncio.run(main())


def test_a_restarted_server_resumes_its_jobs(tmp_path: Path) -> None:
    async def main() -> None:
        argv = ("--batch_chunk_size", "2", "--batch_max_inflight", "1")
        async with running(tmp_path, *argv, delay=0.01) as (s, client):
            batch = await submit(client, jsonl(10))
            while (await client.batches.retrieve(batch.id)).request_counts.completed < 2:  # type: ignore[union-attr]
                await asyncio.sleep(0.01)
        # The first server is gone mid-job (its local tasks cancelled); a new one over the same storage
        # resumes the job by itself and runs only the chunks not done.
        async with running(tmp_path, *argv) as (s, client):
            done = await wait(client, batch.id)
            assert done.status == "completed" and done.request_counts.completed == 10  # type: ignore[union-attr]
            assert len(s.engine.fake.requests) <= 8
            out = await records(client, done.output_file_id)
            assert sorted(r["custom_id"] for r in out) == sorted(f"r-{i}" for i in range(10))

    asyncio.run(main())


def bad_requests() -> list[tuple[str, Any, int]]:
    return [
        ("missing file", {"purpose": "batch"}, 400),
        ("wrong purpose", {"purpose": "fine-tune", "file": jsonl(1)}, 400),
        ("malformed JSONL", {"purpose": "batch", "file": b'{"custom_id": "a"}\n{not json\n'}, 400),
        ("empty file", {"purpose": "batch", "file": b"\n"}, 400),
        ("not utf-8", {"purpose": "batch", "file": b"\xff\xfe"}, 400),
        ("oversize upload", {"purpose": "batch", "file": b"{}\n" * 600}, 413),
    ]


@pytest.mark.parametrize(("case", "form", "status"), bad_requests(), ids=[c[0] for c in bad_requests()])
def test_bad_uploads(tmp_path: Path, case: str, form: dict[str, Any], status: int) -> None:
    async def main() -> None:
        async with server(tmp_path, "--max_file_bytes", "1000") as s, s.client() as http:
            files = {"file": ("x.jsonl", form.pop("file"))} if "file" in form else None
            resp = await http.post("/openai/v1/files", data=form, files=files)
            if files is None:  # httpx sends a form without files urlencoded: force multipart
                resp = await http.post("/openai/v1/files", files={"purpose": (None, "batch")})
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"]

    asyncio.run(main())


def test_bad_batch_requests_get_openai_errors(tmp_path: Path) -> None:
    async def main() -> None:
        async with running(tmp_path, "--max_batch_lines", "5") as (s, client):
            good = await client.files.create(
                file=("in.jsonl", jsonl(2), "application/jsonl"), purpose="batch"
            )

            async def create(data: bytes | None = None, **kwargs: Any) -> Any:
                fid = good.id
                if data is not None:
                    fid = (await client.files.create(file=("x.jsonl", data), purpose="batch")).id
                args = {
                    "input_file_id": fid,
                    "endpoint": "/v1/completions",
                    "completion_window": "24h",
                    **kwargs,
                }
                return await client.batches.create(**args)

            cases: list[tuple[Any, type[openai.APIStatusError], str]] = [
                (create(endpoint="/v1/embeddings"), openai.BadRequestError, "unsupported_endpoint"),
                (create(completion_window="1h"), openai.BadRequestError, "bad_request"),
                (create(input_file_id="file-doesnotexist"), openai.NotFoundError, "not_found"),
                (create(input_file_id="../../etc/passwd"), openai.BadRequestError, "invalid_id"),
                (create(jsonl(2, model="gpt-4o")), openai.BadRequestError, "model_not_found"),
                (create(jsonl(2, url="/v1/chat/completions")), openai.BadRequestError, "invalid_url"),
                (create(jsonl(6)), openai.BadRequestError, "too_many_requests_in_file"),
                (create(b'{"custom_id": "a"}\n'), openai.BadRequestError, "invalid_url"),
                (create(jsonl(1) + jsonl(1)), openai.BadRequestError, "duplicate_custom_id"),
                (create(metadata={"k": "v" * 600}), openai.BadRequestError, "bad_request"),
                (client.batches.retrieve("batch_nope"), openai.NotFoundError, "not_found"),
                (client.batches.retrieve("nope"), openai.BadRequestError, "invalid_id"),
                (client.batches.cancel("batch_nope"), openai.NotFoundError, "not_found"),
                (client.batches.list(limit=1000), openai.BadRequestError, "bad_request"),
                (client.batches.list(after="batch_nope"), openai.NotFoundError, "not_found"),
                (client.files.retrieve("file-nope"), openai.NotFoundError, "not_found"),
                (client.files.content("x" * 300), openai.BadRequestError, "invalid_id"),
                (client.files.delete("file-nope"), openai.NotFoundError, "not_found"),
                (client.files.list(order="sideways"), openai.BadRequestError, "bad_request"),  # type: ignore[arg-type]
            ]
            for call, error, code in cases:
                with pytest.raises(error) as info:
                    await call
                body = info.value.body
                assert isinstance(body, dict) and body["code"] == code, (error, body)
                assert body["message"] and body["type"] == "invalid_request_error"
            # Not JSON, and a body that is not an object: 400, not 500.
            async with s.client() as http:
                for content in (b"{", b"[1]", b'{"input_file_id": 5}'):
                    resp = await http.post("/openai/v1/batches", content=content,
                                           headers={"content-type": "application/json"})  # fmt: skip
                    assert resp.status_code == 400 and resp.json()["error"]["message"]
                resp = await http.post(
                    "/openai/v1/files", content=b"x", headers={"content-type": "text/plain"}
                )
                assert resp.status_code == 400 and resp.json()["error"]["type"] == "invalid_request_error"

    asyncio.run(main())


def test_sink_mode_pushes_every_state_change_with_the_batch_object(tmp_path: Path) -> None:
    from openai.types import Batch

    from tests.conftest import Broker

    ingress = Broker()
    ingress.forward = False  # this test delivers the chunks itself, to see each reply
    ingress.thread.start()

    async def deliver(http: httpx.AsyncClient, event: CloudEvent) -> CloudEvent:
        headers, body = to_binary(event)
        resp = await http.post("/events", headers=headers, content=body)
        assert resp.status_code == 200, resp.text
        return from_http(dict(resp.headers), resp.content)

    def pushed(type_: str) -> list[CloudEvent]:
        return [e for e in ingress.events if e["type"] == f"dev.evllm.{type_}"]

    async def main() -> None:
        async with running(tmp_path, "--sink", ingress.url, "--batch_chunk_size", "2") as (s, client):
            http = httpx.AsyncClient(transport=httpx.ASGITransport(app=s.app), base_url="http://predictor")
            async with http:
                # A job that completes: accepted (pushed), one progress reply per chunk, completed.
                batch = await submit(client, jsonl(4))
                (accepted,) = pushed("batch.progress")
                assert accepted.data["id"] == batch.id and accepted.data["status"] == "in_progress"
                chunks = pushed("batch.chunk")
                assert [c.data["chunk"] for c in chunks] == [0, 1]
                progress = await deliver(http, chunks[0])
                assert progress["type"] == "dev.evllm.batch.progress"
                assert Batch.model_validate(progress.data).request_counts.completed == 2  # type: ignore[union-attr]
                done = await deliver(http, chunks[1])
                assert done["type"] == "dev.evllm.batch.completed"
                final = Batch.model_validate(done.data)
                assert final.status == "completed" and final.output_file_id and final.id == batch.id
                # A job cancelled after its first chunk: cancelling (pushed), then batch.cancelled.
                other = await submit(client, jsonl(4, prefix="x"))
                chunks = pushed("batch.chunk")[2:]
                await deliver(http, chunks[0])
                await client.batches.cancel(other.id)
                cancelling = pushed("batch.progress")[-1]
                assert cancelling.data["id"] == other.id and cancelling.data["status"] == "cancelling"
                cancelled = await deliver(http, chunks[1])
                assert cancelled["type"] == "dev.evllm.batch.cancelled"
                last = Batch.model_validate(cancelled.data)
                assert last.status == "cancelled" and last.request_counts is not None
                assert (last.request_counts.completed, last.request_counts.failed) == (2, 2)

    try:
        asyncio.run(main())
    finally:
        ingress.server.shutdown()
        ingress.server.server_close()


def test_any_replica_answers_for_any_batch(tmp_path: Path) -> None:
    """Two servers over one storage: a batch created on one is read, listed and cancelled on the other
    (the state is in storage, not in the replica that took the request)."""

    async def main() -> None:
        argv = ("--batch_chunk_size", "2", "--batch_max_inflight", "1")
        async with (
            running(tmp_path, *argv, delay=0.02) as (_, a),
            running(tmp_path, *argv, delay=0.02) as (_, b),
        ):
            batch = await submit(a, jsonl(10))
            seen = await b.batches.retrieve(batch.id)
            assert seen.id == batch.id and seen.input_file_id == batch.input_file_id
            assert [x.id for x in (await b.batches.list()).data] == [batch.id]
            assert (await b.files.content(batch.input_file_id)).content == jsonl(10)
            await b.batches.cancel(batch.id)  # replica a runs the job: it sees the marker within a poll
            done = await wait(a, batch.id)
            assert done.status == "cancelled" and done.request_counts.failed > 0  # type: ignore[union-attr]

    asyncio.run(main())


def test_create_with_an_unreachable_sink_is_503_and_leaves_no_batch(tmp_path: Path) -> None:
    from tests.server import free_port

    async def main() -> None:
        sink = f"http://127.0.0.1:{free_port()}/"  # nothing listens there
        async with running(tmp_path, "--sink", sink) as (_, client):
            with pytest.raises(openai.InternalServerError) as info:
                await submit(client, jsonl(2))
            assert info.value.status_code == 503 and info.value.body["type"] == "server_error"  # type: ignore[index]
            assert (await client.batches.list()).data == []

    asyncio.run(main())

"""The OpenAI Files and Batches API under ``/openai/v1``, beside completions/chat: the same jobs as
``batch.submitted`` events (handlers.Handlers runs both), state in the batch store (batchstore.py).

Errors are OpenAI's object, ``{"error": {"message", "type", "param", "code"}}``, with a 4xx for every
client mistake, so the official ``openai`` client raises its usual typed errors.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from fastapi import APIRouter, FastAPI, Request, Response
from fastapi.responses import JSONResponse
from starlette.datastructures import UploadFile

from predictors.errors import EvllmError, NotReady

from .batch import JobRequest, accept, job_key
from .batches import (
    COMPLETION_WINDOW,
    ENDPOINTS,
    FINISHED,
    APIError,
    batch_id_of,
    batch_object,
    check_input,
    check_metadata,
    job_files,
    new_record,
    not_found,
)
from .batchstore import BATCH_ID, FILE_ID, BatchStore
from .cancel import write_marker
from .handlers import Handlers
from .storage import read_bytes

PREFIX = "/openai/v1"
FILES_PATH = PREFIX + "/files"
BATCHES_PATH = PREFIX + "/batches"
MULTIPART_SLACK = 1024 * 1024  # multipart framing and form fields around the file, for the body limit
DEFAULT_LIMIT, MAX_LIMIT = 20, 100

Endpoint = Callable[..., Awaitable[Any]]


def error_body(exc: EvllmError) -> dict[str, Any]:
    status = int(exc.status)
    kind = "invalid_request_error" if status < 500 else "server_error"
    return {
        "error": {
            "message": exc.message,
            "type": kind,
            "param": getattr(exc, "param", None),
            "code": getattr(exc, "code", None) or HTTPStatus(status).phrase.lower().replace(" ", "_"),
        }
    }


def openai_errors(fn: Endpoint) -> Endpoint:
    """Typed errors -> OpenAI's error object (the server's own handlers would answer ``{"error": str}``)."""

    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await fn(*args, **kwargs)
        except EvllmError as exc:
            return JSONResponse(error_body(exc), status_code=int(exc.status), headers=exc.headers)

    return wrapper


def _limit(request: Request) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    try:
        value = int(raw)
    except ValueError:
        raise APIError(f"limit must be an integer, got {raw!r}", param="limit") from None
    if not 1 <= value <= MAX_LIMIT:
        raise APIError(f"limit must be between 1 and {MAX_LIMIT}, got {value}", param="limit")
    return value


def _oldest_first(request: Request) -> bool:
    """The Files list's `order`: `desc` (newest first, the default) or `asc`."""
    order = request.query_params.get("order", "desc")
    if order not in ("asc", "desc"):
        raise APIError(f"order must be 'asc' or 'desc', got {order[:40]!r}", param="order")
    return order == "asc"


def _check_id(kind: str, value: str) -> None:
    pattern = FILE_ID if kind == "File" else BATCH_ID
    if not pattern.match(value):
        raise APIError(f"invalid {kind.lower()} id {value[:80]!r}", param="id", code="invalid_id")


def _public(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if k not in ("location", "created_us", "job_root")}


def _page(items: list[dict[str, Any]], more: bool) -> dict[str, Any]:
    return {
        "object": "list",
        "data": items,
        "first_id": items[0]["id"] if items else None,
        "last_id": items[-1]["id"] if items else None,
        "has_more": more,
    }


def router(handlers: Handlers, model_name: str) -> APIRouter:
    config = handlers.config
    api = APIRouter(include_in_schema=False)

    def store() -> BatchStore:
        if handlers.store is None:
            raise NotReady("the batch store is not configured or not reachable (--batch_store)")
        return handlers.store

    async def file_or_404(file_id: str) -> dict[str, Any]:
        _check_id("File", file_id)
        obj = await asyncio.to_thread(store().file, file_id)
        if obj is None:
            raise not_found("File", file_id)
        return obj

    async def record_or_404(batch_id: str) -> dict[str, Any]:
        _check_id("Batch", batch_id)
        record = await asyncio.to_thread(store().batch, batch_id)
        if record is None:
            raise not_found("Batch", batch_id)
        return record

    # Files -----------------------------------------------------------------------------------------
    @api.post(FILES_PATH)
    @openai_errors
    async def create_file(request: Request) -> JSONResponse:
        s = store()
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise APIError("upload the file as multipart/form-data with fields file and purpose")
        try:
            form = await request.form(max_files=1, max_fields=8)
        except Exception as exc:  # Starlette's parser errors are the client's malformed body
            raise APIError(f"cannot parse the multipart body: {exc}") from None
        try:
            purpose = form.get("purpose")
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                raise APIError("missing file: send it as the multipart field 'file'", param="file")
            if purpose != "batch":
                raise APIError(f"purpose must be 'batch' (the only purpose this server takes), got {purpose!r}",
                               param="purpose")  # fmt: skip
            data = await upload.read(config.max_file_bytes + 1)
            filename = upload.filename or "upload.jsonl"
        finally:
            await form.close()
        if len(data) > config.max_file_bytes:
            raise APIError(f"the file is over the {config.max_file_bytes} byte limit (--max_file_bytes)",
                           status=413, param="file", code="file_too_large")  # fmt: skip
        check_jsonl(data)
        obj = await asyncio.to_thread(s.add_file, filename, "batch", data=data)
        return JSONResponse(_public(obj))

    @api.get(FILES_PATH)
    @openai_errors
    async def list_files(request: Request) -> JSONResponse:
        after = request.query_params.get("after")
        purpose = request.query_params.get("purpose")
        limit = _limit(request)
        oldest_first = _oldest_first(request)
        if after is not None:
            await file_or_404(after)
        items, more = await asyncio.to_thread(store().list_files, after, limit, purpose, oldest_first)
        return JSONResponse(_page([_public(f) for f in items], more))

    @api.get(FILES_PATH + "/{file_id}")
    @openai_errors
    async def get_file(file_id: str) -> JSONResponse:
        return JSONResponse(_public(await file_or_404(file_id)))

    @api.get(FILES_PATH + "/{file_id}/content")
    @openai_errors
    async def file_content(file_id: str) -> Response:
        obj = await file_or_404(file_id)
        loc = handlers.storage.resolve(obj["location"])
        data = await asyncio.to_thread(read_bytes, loc)
        return Response(data, media_type="application/jsonl")

    @api.delete(FILES_PATH + "/{file_id}")
    @openai_errors
    async def delete_file(file_id: str) -> JSONResponse:
        obj = await file_or_404(file_id)
        await asyncio.to_thread(store().delete_file, obj)
        return JSONResponse({"id": file_id, "object": "file", "deleted": True})

    # Batches ---------------------------------------------------------------------------------------
    @api.post(BATCHES_PATH)
    @openai_errors
    async def create_batch(request: Request) -> JSONResponse:
        s = store()
        try:
            body = json.loads(await request.body())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise APIError(f"the body is not valid JSON: {exc}") from None
        if not isinstance(body, dict):
            raise APIError("the body must be a JSON object")
        for name in ("input_file_id", "endpoint", "completion_window"):
            if not isinstance(body.get(name), str):
                raise APIError(f"missing required parameter {name!r}", param=name,
                               code="missing_required_parameter")  # fmt: skip
        endpoint = body["endpoint"]
        if endpoint not in ENDPOINTS:
            raise APIError(f"endpoint must be one of {', '.join(ENDPOINTS)}, got {endpoint!r}",
                           param="endpoint", code="unsupported_endpoint")  # fmt: skip
        if body["completion_window"] != COMPLETION_WINDOW:
            raise APIError(f"completion_window must be {COMPLETION_WINDOW!r}", param="completion_window")
        metadata = check_metadata(body.get("metadata"))
        file_id = body["input_file_id"]
        if not FILE_ID.match(file_id):
            raise APIError(
                f"invalid input_file_id {file_id[:80]!r}", param="input_file_id", code="invalid_id"
            )
        src = await asyncio.to_thread(s.file, file_id)
        if src is None:
            raise APIError(f"No such File object: {file_id!r}", status=404, param="input_file_id",
                           code="not_found")  # fmt: skip
        if src["purpose"] != "batch":
            raise APIError(f"file {file_id} has purpose {src['purpose']!r}; a batch input needs 'batch'",
                           param="input_file_id")  # fmt: skip
        raw = await asyncio.to_thread(read_bytes, handlers.storage.resolve(src["location"]))
        await asyncio.to_thread(check_input, raw, endpoint, model_name, config.max_batch_lines)
        created_us = time.time_ns() // 1000
        job_id = hashlib.sha256(f"{file_id}:{created_us}:{id(request)}".encode()).hexdigest()[:24]
        deadline = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(created_us // 1_000_000 + 24 * 3600))
        req = JobRequest(job_id, src["location"], s.jobs.uri, config.batch_chunk_size, deadline)
        manifest, files, _ = await asyncio.to_thread(accept, handlers.storage, req, config.max_batch_lines)
        batch_id = batch_id_of(manifest)
        record = new_record(batch_id, endpoint=endpoint, input_file_id=file_id, metadata=metadata,
                            job=files, model=model_name, created_us=created_us)  # fmt: skip
        record["in_progress_at"] = int(time.time())
        await asyncio.to_thread(s.set_active, batch_id, True)
        await asyncio.to_thread(s.put_batch, record)
        try:
            await handlers.start(manifest, files)
        except NotReady:
            # K_SINK unreachable: no batch (the client retries the create); chunks already sent end
            # cancelled instead of running for a batch nobody knows.
            await asyncio.to_thread(write_marker, files.cancel)
            await asyncio.to_thread(s.delete_batch, record)
            raise
        key = job_key(manifest.output, manifest.job_id)
        event = await asyncio.to_thread(handlers.progress_event, manifest, files, f"batch-{key}-accepted")
        await handlers.announce(event)
        return JSONResponse(await asyncio.to_thread(batch_object, s, handlers.storage, record))

    @api.get(BATCHES_PATH)
    @openai_errors
    async def list_batches(request: Request) -> JSONResponse:
        s = store()
        after = request.query_params.get("after")
        limit = _limit(request)
        if after is not None:
            await record_or_404(after)

        def page() -> dict[str, Any]:
            records, more = s.list_batches(after, limit)
            return _page([batch_object(s, handlers.storage, r) for r in records], more)

        return JSONResponse(await asyncio.to_thread(page))

    @api.get(BATCHES_PATH + "/{batch_id}")
    @openai_errors
    async def get_batch(batch_id: str) -> JSONResponse:
        record = await record_or_404(batch_id)
        return JSONResponse(await asyncio.to_thread(batch_object, store(), handlers.storage, record))

    @api.post(BATCHES_PATH + "/{batch_id}/cancel")
    @openai_errors
    async def cancel_batch(batch_id: str) -> JSONResponse:
        s = store()
        record = await record_or_404(batch_id)
        current = await asyncio.to_thread(batch_object, s, handlers.storage, record)
        if current["status"] in FINISHED:
            raise APIError(f"cannot cancel batch {batch_id}: its status is {current['status']!r}",
                           status=409, code="batch_not_cancellable")  # fmt: skip
        files = await asyncio.to_thread(job_files, handlers.storage, record)
        manifest = await asyncio.to_thread(files.load_manifest)
        if manifest is None:
            raise APIError(f"batch {batch_id} is still validating; retry the cancel", status=409)
        event = await handlers.cancel_job(manifest, files)
        await handlers.announce(event)
        return JSONResponse(await asyncio.to_thread(batch_object, s, handlers.storage, record))

    return api


def check_jsonl(data: bytes) -> None:
    """A batch upload must be JSONL: UTF-8, one JSON object per non-empty line (checked at upload, as
    OpenAI does; the lines' content is checked when a batch is created, against its endpoint)."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise APIError("the file is not UTF-8 text", param="file", code="invalid_file") from None
    n = 0
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            raise APIError(f"line {n} is not valid JSON ({exc.msg}); a batch file is JSONL",
                           param="file", code="invalid_jsonl") from None  # fmt: skip
        if not isinstance(obj, dict):
            raise APIError(f"line {n} must be a JSON object", param="file", code="invalid_jsonl")
    if not text.strip():
        raise APIError("the file is empty", param="file", code="empty_file")


def attach(app: FastAPI, handlers: Handlers, model_name: str) -> None:
    """Add the routes ahead of the ``/openai`` mount (vLLM's sub-app), which would otherwise take them."""
    routes = router(handlers, model_name).routes
    app.router.routes[0:0] = routes

"""OpenAI batch objects over jobs: create-time validation, the batch record, and the batch object (status,
request counts, output/error files, timestamps) read from the job's files in storage.

Status: ``validating`` (record written, job not accepted yet) -> ``in_progress`` (manifest written) ->
``finalizing`` (every chunk done, merge pending) -> ``completed`` / ``expired`` / ``cancelled`` (result
written); ``cancelling`` while a cancel marker exists and the result does not; ``failed`` for a job that
could not be accepted.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from typing import Any

from predictors.errors import EvllmError, InvalidInput

from .batch import JobFiles, Manifest, job_key, split_lines
from .batchstore import BatchStore
from .cancel import read_marker
from .chunk import COMPLETED, Progress, job_counts, read_result
from .storage import Location, Storage
from .storage import size as storage_size

ENDPOINTS = ("/v1/completions", "/v1/chat/completions")
COMPLETION_WINDOW = "24h"
WINDOW_SECONDS = 24 * 3600
FINISHED = ("completed", "failed", "expired", "cancelled")


class APIError(EvllmError):
    """An OpenAI API error: ``{"error": {"message", "type", "param", "code"}}`` with its status."""

    def __init__(self, message: str, *, status: int = 400, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status = status
        self.param, self.code = param, code


def not_found(kind: str, id_: str) -> APIError:
    return APIError(f"No such {kind} object: {id_!r}", status=404, param="id", code="not_found")


def batch_id_of(manifest: Manifest) -> str:
    """A ``batch.submitted`` job's batch id: derived from the job (output + job_id), so every replica and
    every redelivery names it the same."""
    return "batch_" + job_key(manifest.output, manifest.job_id)


def check_metadata(metadata: Any) -> dict[str, str] | None:
    if metadata is None:
        return None
    if not isinstance(metadata, dict) or len(metadata) > 16:
        raise APIError("metadata must be an object of at most 16 string pairs", param="metadata")
    for k, v in metadata.items():
        if not isinstance(k, str) or not isinstance(v, str) or len(k) > 64 or len(v) > 512:
            raise APIError(
                "metadata keys must be strings of at most 64 characters and values strings of at most 512",
                param="metadata",
            )
    return metadata


def check_input(raw: bytes, endpoint: str, model: str, max_lines: int) -> int:
    """Validate a batch input file for ``endpoint`` the way OpenAI's validation does, all at once before
    the job exists (every problem is the client's: 400 with the line). Returns the number of lines."""
    try:
        lines = split_lines(raw, "the input file")
    except InvalidInput as exc:
        raise APIError(exc.message, param="input_file_id", code="invalid_file") from None
    if not lines:
        raise APIError("the input file has no lines", param="input_file_id", code="empty_file")
    if len(lines) > max_lines:
        raise APIError(
            f"the input file has {len(lines)} lines; the limit is {max_lines} per batch",
            param="input_file_id",
            code="too_many_requests_in_file",
        )
    seen: set[str] = set()
    for n, text in enumerate(lines, 1):

        def bad(message: str, code: str = "invalid_request", n: int = n) -> APIError:
            return APIError(f"line {n}: {message}", param="input_file_id", code=code)

        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise bad(f"not valid JSON ({exc.msg})", "invalid_json_line") from None
        if not isinstance(obj, dict):
            raise bad("must be a JSON object", "invalid_json_line")
        cid = obj.get("custom_id")
        if not isinstance(cid, str) or not cid:
            raise bad("custom_id must be a non-empty string", "missing_required_parameter")
        if cid in seen:
            raise bad(f"duplicate custom_id {cid!r}", "duplicate_custom_id")
        seen.add(cid)
        if obj.get("method", "POST") != "POST":
            raise bad("method must be POST", "invalid_method")
        if obj.get("url") != endpoint:
            raise bad(
                f"url {obj.get('url')!r} does not match the batch's endpoint {endpoint!r}", "invalid_url"
            )
        body = obj.get("body")
        if not isinstance(body, dict):
            raise bad("body must be a JSON object", "invalid_body")
        if body.get("model") != model:
            raise bad(f"model {body.get('model')!r} is not served here (this server serves {model!r})",
                      "model_not_found")  # fmt: skip
        if body.get("stream"):
            raise bad("stream is not supported in batch lines", "invalid_body")
    return len(lines)


def new_record(
    batch_id: str,
    *,
    endpoint: str,
    input_file_id: str,
    metadata: dict[str, str] | None,
    job: JobFiles,
    model: str,
    created_us: int | None = None,
) -> dict[str, Any]:
    created_us = time.time_ns() // 1000 if created_us is None else created_us
    created = created_us // 1_000_000
    return {
        "id": batch_id,
        "endpoint": endpoint,
        "input_file_id": input_file_id,
        "completion_window": COMPLETION_WINDOW,
        "metadata": metadata,
        "model": model,
        "created_at": created,
        "expires_at": created + WINDOW_SECONDS,
        "created_us": created_us,
        "job_root": job.root.uri,  # the job's directory: <output>/<job_id>
    }


def job_files(storage: Storage, record: dict[str, Any]) -> JobFiles:
    parent, _, job_id = record["job_root"].rstrip("/").rpartition("/")
    return JobFiles(storage.resolve(parent, write=True), job_id)


def _file_id(batch_id: str, kind: str) -> str:
    return "file-" + hashlib.sha256(f"{batch_id}:{kind}".encode()).hexdigest()[:24]


# Batch objects are built in threads (a retrieve and the job's own events at once): one registers.
_registering = threading.Lock()


def _result_file(store: BatchStore, batch_id: str, kind: str, loc: Location) -> str:
    """The file object of a finished job's output or error file (registered once, id from the batch;
    replicas racing to register it leave index entries the listing skips)."""
    file_id = _file_id(batch_id, kind)
    with _registering:
        if store.file(file_id) is None:
            size = storage_size(loc)
            name = f"{batch_id}_{'output' if kind == 'output' else 'error'}.jsonl"
            store.add_file(name, "batch_output", location=loc, size=size, file_id=file_id)
    return file_id


def batch_object(
    store: BatchStore, storage: Storage, record: dict[str, Any], progress: Progress | None = None
) -> dict[str, Any]:
    """The OpenAI batch object of ``record`` as its job's files say now (blocking: run in a thread);
    ``progress``: the job's counts when the caller just read them."""
    files = job_files(storage, record)
    obj: dict[str, Any] = {
        "id": record["id"],
        "object": "batch",
        "endpoint": record["endpoint"],
        "model": record.get("model"),
        "errors": None,
        "input_file_id": record["input_file_id"],
        "completion_window": record["completion_window"],
        "status": "validating",
        "output_file_id": None,
        "error_file_id": None,
        "created_at": record["created_at"],
        "in_progress_at": None,
        "expires_at": record["expires_at"],
        "finalizing_at": None,
        "completed_at": None,
        "failed_at": None,
        "expired_at": None,
        "cancelling_at": None,
        "cancelled_at": None,
        "request_counts": {"total": 0, "completed": 0, "failed": 0},
        "metadata": record.get("metadata"),
    }
    if record.get("errors"):
        obj.update(status="failed", errors={"object": "list", "data": record["errors"]},
                   failed_at=record.get("failed_at"))  # fmt: skip
        return obj
    manifest = files.load_manifest()
    if manifest is None:
        return obj
    obj["in_progress_at"] = record.get("in_progress_at", record["created_at"])
    cancel_at = read_marker(files.cancel)
    if cancel_at is not None:
        obj["cancelling_at"] = int(cancel_at)
    result = read_result(files)
    if result is not None:
        counts = result.request_counts
        done_at = result.completed_at or int(time.time())
        obj.update(status=result.status, request_counts=counts, finalizing_at=result.finalizing_at)
        ended = {COMPLETED: "completed_at", "cancelled": "cancelled_at", "expired": "expired_at"}
        obj[ended.get(result.status, "completed_at")] = done_at
        if counts["completed"]:
            obj["output_file_id"] = _result_file(store, record["id"], "output", files.output)
        if counts["failed"]:
            obj["error_file_id"] = _result_file(store, record["id"], "errors", files.errors)
        return obj
    progress = progress or job_counts(files, manifest)
    obj["request_counts"] = progress.request_counts
    if cancel_at is not None:
        obj["status"] = "cancelling"
    elif progress.chunks_done == manifest.chunks:
        obj["status"] = "finalizing"
    else:
        obj["status"] = "in_progress"
    return obj

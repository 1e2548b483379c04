"""Batch jobs: the submitted job, its files under the output URI, and OpenAI batch line records.

Layout under ``<output>/<job_id>/``::

    job.json              manifest, written once the input snapshot is safe (job accepted)
    input.jsonl           snapshot of the input, so a retried chunk sees exactly the same lines
    parts/chunk-NNNNNN.jsonl  one record per line of the chunk, written atomically (exactly-once unit)
    output.jsonl          merged successful lines (OpenAI batch output format)
    errors.jsonl          merged failed lines, same format with ``error`` set
    counts.json           per-chunk request counts seen so far (a cache of the parts, see chunk.job_counts)
    cancel.json           cancel marker: its existence cancels the job (see cancel.py)
    result.json           completion record: counts, status, the completion event id (written last)
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Any

from predictors.errors import InvalidInput
from predictors.openai import CALL_URLS as BATCH_URLS

from . import catalog, metrics
from .events import is_rfc3339
from .storage import Location, Storage, StorageError, exists, read_bytes, write_atomic


class JobError(InvalidInput):
    """The job cannot run (bad data, unreadable input, forbidden path): reported as batch.failed."""


@dataclass(frozen=True)
class Manifest:
    job_id: str
    input: str  # the input URI, or "inline"
    output: str
    chunk_size: int
    total: int
    chunks: int
    input_sha256: str
    deadline: str | None = None
    duplicates: tuple[int, ...] = ()  # line indexes whose custom_id appeared earlier

    def to_json(self) -> bytes:
        return json.dumps({**asdict(self), "duplicates": list(self.duplicates)}, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        obj = json.loads(raw)
        obj["duplicates"] = tuple(obj.get("duplicates", ()))
        return cls(**obj)

    def chunk_range(self, index: int) -> range:
        return range(index * self.chunk_size, min(self.total, (index + 1) * self.chunk_size))

    def expired(self, now: dt.datetime | None = None) -> bool:
        if not self.deadline:
            return False
        deadline = dt.datetime.fromisoformat(self.deadline.replace("Z", "+00:00").replace("z", "+00:00"))
        return (now or dt.datetime.now(dt.timezone.utc)) > deadline


class JobFiles:
    """Where one job's files live (see the module docstring)."""

    def __init__(self, output: Location, job_id: str):
        self.root = output.child(job_id)
        self.manifest = self.root.child("job.json")
        self.input = self.root.child("input.jsonl")
        self.parts = self.root.child("parts")
        self.output = self.root.child("output.jsonl")
        self.errors = self.root.child("errors.jsonl")
        self.result = self.root.child("result.json")
        self.counts = self.root.child("counts.json")
        self.cancel = self.root.child("cancel.json")

    def part(self, index: int) -> Location:
        return self.parts.child(f"chunk-{index:06d}.jsonl")

    def load_manifest(self) -> Manifest | None:
        if not exists(self.manifest):
            return None
        return Manifest.from_json(read_bytes(self.manifest))


def job_key(output_uri: str, job_id: str) -> str:
    """Stable identity of a job (for deterministic event and record ids)."""
    return hashlib.sha256(f"{output_uri.rstrip('/')}\0{job_id}".encode()).hexdigest()[:16]


def split_lines(raw: bytes, where: str) -> list[str]:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise JobError(f"input {where} is not UTF-8 text") from None
    return [line for line in text.splitlines() if line.strip()]


def inline_lines(items: list[Any]) -> list[str]:
    """Inline input items (line objects or JSON strings) -> JSONL lines."""
    return [item if isinstance(item, str) else json.dumps(item, separators=(",", ":")) for item in items]


@dataclass(frozen=True)
class Line:
    index: int
    custom_id: str | None
    url: str | None = None
    body: dict[str, Any] | None = None
    error: str | None = None  # why the line is invalid (it is failed without calling the engine)


def parse_line(index: int, text: str) -> Line:
    """One OpenAI batch input line -> Line; problems are line errors, never job errors."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Line(index, None, error=f"line {index + 1} is not valid JSON: {exc.msg}")
    if not isinstance(obj, dict):
        return Line(index, None, error=f"line {index + 1} must be a JSON object")
    custom_id = obj.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        return Line(index, None, error=f"line {index + 1}: custom_id must be a non-empty string")
    method = obj.get("method", "POST")
    if method != "POST":
        return Line(index, custom_id, error=f"method must be POST, got {method!r}")
    url = obj.get("url")
    if url not in BATCH_URLS:
        return Line(index, custom_id, error=f"url must be one of {', '.join(BATCH_URLS)}, got {url!r}")
    body = obj.get("body")
    if not isinstance(body, dict):
        return Line(index, custom_id, error="body must be a JSON object")
    if body.get("stream"):
        return Line(index, custom_id, error="stream is not supported in batch lines")
    return Line(index, custom_id, url, body)


def duplicate_indexes(lines: list[str]) -> tuple[int, ...]:
    seen: set[str] = set()
    dups = []
    for i, text in enumerate(lines):
        cid = parse_line(i, text).custom_id
        if cid is None:
            continue
        if cid in seen:
            dups.append(i)
        seen.add(cid)
    return tuple(dups)


def record_id(key: str, index: int) -> str:
    return "batch_req_" + hashlib.sha256(f"{key}:{index}".encode()).hexdigest()[:24]


def success_record(key: str, line: Line, status: int, body: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": record_id(key, line.index),
        "custom_id": line.custom_id,
        "response": {"status_code": status, "request_id": str(body.get("id", "")), "body": body},
        "error": None,
    }


def error_record(
    key: str, line: Line, message: str, code: str, status: int | None = None, body: Any = None
) -> dict[str, Any]:
    response = None if status is None else {"status_code": status, "request_id": "", "body": body}
    return {
        "id": record_id(key, line.index),
        "custom_id": line.custom_id,
        "response": response,
        "error": {"code": code, "message": message},
    }


@dataclass(frozen=True)
class JobRequest:
    job_id: str
    input: str | list[Any]
    output: str
    chunk_size: int
    deadline: str | None


def parse_job(data: Any, default_chunk_size: int) -> JobRequest:
    problems = catalog.errors("batch.submitted", data)
    if problems:
        raise JobError("invalid batch.submitted data: " + "; ".join(problems[:5]))
    deadline = data.get("deadline")
    if deadline is not None and not is_rfc3339(deadline):
        raise JobError(f"deadline must be an RFC 3339 timestamp, got {deadline!r}")
    return JobRequest(
        data["job_id"],
        data["input"],
        data["output"],
        int(data.get("chunk_size") or default_chunk_size),
        deadline,
    )


def accept(
    storage: Storage, req: JobRequest, max_lines: int | None = None
) -> tuple[Manifest, JobFiles, Location]:
    """Snapshot the input and write the manifest (idempotent: an existing job with the same input is
    returned as is). Raises JobError when the job cannot run."""
    try:
        out = storage.resolve(req.output, write=True)
    except StorageError as exc:
        raise JobError(f"output: {exc.message}") from None
    files = JobFiles(out, req.job_id)
    if isinstance(req.input, list):
        lines, where = inline_lines(req.input), "inline"
    else:
        try:
            src = storage.resolve(req.input)
            lines = split_lines(read_bytes(src), src.uri)
        except StorageError as exc:
            raise JobError(f"input: {exc.message}") from None
        where = src.uri
    if not lines:
        raise JobError(f"input {where} has no lines")
    if max_lines is not None and len(lines) > max_lines:
        raise JobError(f"input {where} has {len(lines)} lines; the limit is {max_lines} per job")
    snapshot = ("\n".join(lines) + "\n").encode()
    digest = hashlib.sha256(snapshot).hexdigest()
    try:
        existing = files.load_manifest()
    except StorageError as exc:
        raise JobError(f"output: {exc.message}") from None
    if existing is not None:
        if existing.input_sha256 != digest:
            raise JobError(f"job {req.job_id} already exists in {out.uri} with a different input")
        return existing, files, out
    manifest = Manifest(
        job_id=req.job_id,
        input=where,
        output=out.uri,
        chunk_size=req.chunk_size,
        total=len(lines),
        chunks=(len(lines) + req.chunk_size - 1) // req.chunk_size,
        input_sha256=digest,
        deadline=req.deadline,
        duplicates=duplicate_indexes(lines),
    )
    # Snapshot first, manifest last: the manifest's existence means the job is fully accepted.
    try:
        write_atomic(files.input, snapshot)
        write_atomic(files.manifest, manifest.to_json())
    except StorageError as exc:  # StorageUnavailable is not one: it stays a 503 (retried)
        raise JobError(f"output: {exc.message}") from None
    metrics.job("accepted")
    return manifest, files, out

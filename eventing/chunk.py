"""Chunks: the bounded, idempotent unit of batch work, and the exactly-once completion of a job.

Crash points, and why each is safe:

* during a chunk (before its part file exists): nothing was written; the redelivered chunk reruns;
* two deliveries of one chunk at once: both compute the chunk, the rename makes one part file win,
  and a part file holds each line index once, so nothing is duplicated;
* after the part file, before the reply: the redelivered chunk finds the part, skips the work, and
  still runs the completion check (so the last chunk's redelivery completes the job);
* during the merge: output/errors files are rewritten whole from the parts (deterministic), and
  ``result.json`` is written last, so a rerun of the merge produces the same files;
* after ``result.json``: every later delivery answers with the same batch.completed event (its id is
  derived from the job), which the broker's consumers dedup on source + id.

Per-job request counts stay O(1) storage operations per chunk (``job_counts``): one listing of the parts,
``counts.json`` (per-chunk counts already seen) and only the parts it does not cover yet. The listing is
the truth and ``counts.json`` a cache keyed by chunk index, so a redelivered chunk or a lost update (two
replicas writing it at once) can neither count a chunk twice nor lose it.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from predictors.errors import NotReady, Overloaded

from . import metrics
from .batch import JobFiles, Line, Manifest, error_record, job_key, parse_line, split_lines
from .cancel import CancelToken, read_marker
from .executor import CANCELLED, Executor, cancelled_record
from .storage import exists, listdir, read_bytes, write_atomic

COMPLETED, EXPIRED = "completed", "expired"  # with CANCELLED: how a job ends (OpenAI batch statuses)


@dataclass(frozen=True)
class Completion:
    job_id: str
    output_file: str
    error_file: str
    request_counts: dict[str, int]
    event_id: str
    status: str = COMPLETED  # completed | cancelled | expired
    finalizing_at: int | None = None  # unix seconds: merge started
    completed_at: int | None = None  # unix seconds: result written

    def data(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "output_file": self.output_file,
            "error_file": self.error_file,
            "request_counts": self.request_counts,
        }


def completed_event_id(manifest: Manifest) -> str:
    return f"batch-{job_key(manifest.output, manifest.job_id)}-completed"


_INPUT_CACHE_SIZE = 2
_input_cache: OrderedDict[tuple[str, str], list[str]] = OrderedDict()
_input_lock = threading.Lock()


def _input_lines(files: JobFiles, manifest: Manifest) -> list[str]:
    """The job's input lines, read once per process: every chunk of a job would otherwise read and
    split the whole input again (O(lines x chunks)). The job's input copy never changes (its sha256 is
    in the manifest), so the cache cannot go stale."""
    key = (files.input.uri, manifest.input_sha256)
    with _input_lock:  # held while reading: chunks starting together read the input once
        if key not in _input_cache:
            _input_cache[key] = split_lines(read_bytes(files.input), files.input.uri)
            while len(_input_cache) > _INPUT_CACHE_SIZE:
                _input_cache.popitem(last=False)
        _input_cache.move_to_end(key)
        return _input_cache[key]


def chunk_lines(files: JobFiles, manifest: Manifest, index: int) -> list[Line]:
    texts = _input_lines(files, manifest)
    dups = set(manifest.duplicates)
    lines = []
    for i in manifest.chunk_range(index):
        line = parse_line(i, texts[i])
        if i in dups and line.error is None:
            line = Line(i, line.custom_id, error=f"duplicate custom_id {line.custom_id!r}")
        lines.append(line)
    return lines


async def run_chunk(
    executor: Executor, files: JobFiles, manifest: Manifest, index: int, cancel: CancelToken | None = None
) -> bool:
    """Run chunk ``index`` unless its part file exists; True when this call wrote the part. A cancelled
    job (the token, or the marker in storage) writes the part without calling the engine for the lines
    that did not complete. ``cancel``: the job's token from cancel.Cancellations (its watcher polls the
    marker); without one the marker is read once here."""
    try:
        wrote = await _run_chunk(executor, files, manifest, index, cancel)
    except (NotReady, Overloaded):
        metrics.chunk("retried")
        raise
    except Exception:
        metrics.chunk("failed")
        raise
    metrics.chunk("completed" if wrote else "skipped")
    return wrote


async def _run_chunk(
    executor: Executor, files: JobFiles, manifest: Manifest, index: int, cancel: CancelToken | None
) -> bool:
    if not 0 <= index < manifest.chunks:
        raise ValueError(f"chunk {index} out of range: job {manifest.job_id} has {manifest.chunks} chunks")
    part = files.part(index)
    if await asyncio.to_thread(exists, part):
        return False
    key = job_key(manifest.output, manifest.job_id)
    lines = await asyncio.to_thread(chunk_lines, files, manifest, index)
    if cancel is None:  # no watcher: check the marker here (a watcher read it and keeps polling it)
        cancel = CancelToken()
        at = await asyncio.to_thread(read_marker, files.cancel)
        if at is not None:
            cancel.fire(at)
    if cancel.cancelled:
        records = [cancelled_record(key, line) for line in lines]
    elif manifest.expired():
        records = [error_record(key, line, "the job's deadline passed before this line ran", EXPIRED)
                   for line in lines]  # fmt: skip
    else:
        records = await executor.run_lines(key, lines, cancel)
    if await asyncio.to_thread(exists, part):
        return False  # a concurrent delivery finished first; its records are equivalent
    body = "".join(
        json.dumps({"line": line.index, "ok": rec["error"] is None, "record": rec}) + "\n"
        for line, rec in zip(lines, records, strict=True)
    )
    await asyncio.to_thread(write_atomic, part, body.encode())
    ok = sum(1 for rec in records if rec["error"] is None)
    await asyncio.to_thread(_record_counts, files, {index: (ok, len(records) - ok)})
    return True


def _done_chunks(files: JobFiles, manifest: Manifest) -> list[int]:
    names = set(listdir(files.parts))
    return [i for i in range(manifest.chunks) if files.part(i).path.rsplit("/", 1)[-1] in names]


def chunks_done(files: JobFiles, manifest: Manifest) -> int:
    return len(_done_chunks(files, manifest))


def _read_counts(files: JobFiles) -> dict[int, tuple[int, int]]:
    if not exists(files.counts):
        return {}
    try:
        raw = json.loads(read_bytes(files.counts))
        return {int(k): (int(v[0]), int(v[1])) for k, v in raw["chunks"].items()}
    except (ValueError, KeyError, TypeError, IndexError):
        return {}  # a cache: rebuilt from the parts


def _write_counts(files: JobFiles, counts: dict[int, tuple[int, int]]) -> None:
    body = {"chunks": {str(k): list(v) for k, v in sorted(counts.items())}}
    write_atomic(files.counts, json.dumps(body, separators=(",", ":")).encode())


def _record_counts(files: JobFiles, fresh: dict[int, tuple[int, int]]) -> None:
    counts = _read_counts(files)
    if any(counts.get(i) != v for i, v in fresh.items()):
        _write_counts(files, {**counts, **fresh})


@dataclass(frozen=True)
class Progress:
    chunks_done: int
    request_counts: dict[str, int]


def job_counts(files: JobFiles, manifest: Manifest) -> Progress:
    """Chunks done and request counts so far: one listing, one read of counts.json, and a read of each
    part counts.json does not cover yet (amortized O(1) per chunk; see the module docstring)."""
    done = _done_chunks(files, manifest)
    counts = _read_counts(files)
    missing = [i for i in done if i not in counts]
    for i in missing:
        recs = _records(files, i)
        ok = sum(1 for rec in recs if rec["ok"])
        counts[i] = (ok, len(recs) - ok)
    if missing:
        _write_counts(files, counts)
    ok = sum(counts[i][0] for i in done)
    failed = sum(counts[i][1] for i in done)
    return Progress(len(done), {"total": manifest.total, "completed": ok, "failed": failed})


def read_result(files: JobFiles) -> Completion | None:
    if not exists(files.result):
        return None
    return Completion(**json.loads(read_bytes(files.result)))


def _records(files: JobFiles, index: int) -> list[dict[str, Any]]:
    raw = read_bytes(files.part(index)).decode()
    return [json.loads(line) for line in raw.splitlines() if line.strip()]


def complete(files: JobFiles, manifest: Manifest) -> Completion | None:
    """Merge the parts once every chunk is done; None while chunks are missing. Idempotent."""
    done = read_result(files)
    if done is not None:
        return done
    if chunks_done(files, manifest) < manifest.chunks:
        return None
    finalizing_at = int(time.time())
    by_line: dict[int, dict[str, Any]] = {}
    for i in range(manifest.chunks):
        for rec in _records(files, i):
            by_line.setdefault(rec["line"], rec)  # a line index appears once, whatever happened
    missing = [i for i in range(manifest.total) if i not in by_line]
    if missing:
        raise RuntimeError(f"job {manifest.job_id}: parts are missing lines {missing[:5]}")
    good = [by_line[i] for i in range(manifest.total) if by_line[i]["ok"]]
    bad = [by_line[i] for i in range(manifest.total) if not by_line[i]["ok"]]
    codes = {(r["record"].get("error") or {}).get("code") for r in bad}
    if CANCELLED in codes or exists(files.cancel):
        status = CANCELLED
    elif EXPIRED in codes:
        status = EXPIRED
    else:
        status = COMPLETED
    write_atomic(files.output, "".join(json.dumps(r["record"]) + "\n" for r in good).encode())
    write_atomic(files.errors, "".join(json.dumps(r["record"]) + "\n" for r in bad).encode())
    completion = Completion(
        job_id=manifest.job_id,
        output_file=files.output.uri,
        error_file=files.errors.uri,
        request_counts={"total": manifest.total, "completed": len(good), "failed": len(bad)},
        event_id=completed_event_id(manifest),
        status=status,
        finalizing_at=finalizing_at,
        completed_at=int(time.time()),
    )
    write_atomic(files.result, json.dumps(asdict(completion)).encode())
    metrics.job("cancelled" if status == CANCELLED else "completed")
    return completion

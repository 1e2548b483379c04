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
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Any

from predictors.errors import NotReady, Overloaded

from . import metrics
from .batch import JobFiles, Line, Manifest, error_record, job_key, parse_line, split_lines
from .executor import Executor
from .storage import exists, listdir, read_bytes, write_atomic


@dataclass(frozen=True)
class Completion:
    job_id: str
    output_file: str
    error_file: str
    request_counts: dict[str, int]
    event_id: str

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


async def run_chunk(executor: Executor, files: JobFiles, manifest: Manifest, index: int) -> bool:
    """Run chunk ``index`` unless its part file exists; True when this call wrote the part."""
    try:
        wrote = await _run_chunk(executor, files, manifest, index)
    except (NotReady, Overloaded):
        metrics.chunk("retried")
        raise
    except Exception:
        metrics.chunk("failed")
        raise
    metrics.chunk("completed" if wrote else "skipped")
    return wrote


async def _run_chunk(executor: Executor, files: JobFiles, manifest: Manifest, index: int) -> bool:
    if not 0 <= index < manifest.chunks:
        raise ValueError(f"chunk {index} out of range: job {manifest.job_id} has {manifest.chunks} chunks")
    part = files.part(index)
    if await asyncio.to_thread(exists, part):
        return False
    key = job_key(manifest.output, manifest.job_id)
    lines = await asyncio.to_thread(chunk_lines, files, manifest, index)
    if manifest.expired():
        records = [error_record(key, line, "the job's deadline passed before this line ran", "expired")
                   for line in lines]  # fmt: skip
    else:
        records = await executor.run_lines(key, lines)
    if await asyncio.to_thread(exists, part):
        return False  # a concurrent delivery finished first; its records are equivalent
    body = "".join(
        json.dumps({"line": line.index, "ok": rec["error"] is None, "record": rec}) + "\n"
        for line, rec in zip(lines, records, strict=True)
    )
    await asyncio.to_thread(write_atomic, part, body.encode())
    return True


def chunks_done(files: JobFiles, manifest: Manifest) -> int:
    names = set(listdir(files.parts))
    return sum(1 for i in range(manifest.chunks) if files.part(i).path.rsplit("/", 1)[-1] in names)


def read_result(files: JobFiles) -> Completion | None:
    if not exists(files.result):
        return None
    return Completion(**json.loads(read_bytes(files.result)))


def partial_counts(files: JobFiles, manifest: Manifest) -> dict[str, int]:
    """Request counts over the part files written so far."""
    ok = failed = 0
    for i in range(manifest.chunks):
        if exists(files.part(i)):
            for rec in _records(files, i):
                ok, failed = (ok + 1, failed) if rec["ok"] else (ok, failed + 1)
    return {"total": manifest.total, "completed": ok, "failed": failed}


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
    by_line: dict[int, dict[str, Any]] = {}
    for i in range(manifest.chunks):
        for rec in _records(files, i):
            by_line.setdefault(rec["line"], rec)  # a line index appears once, whatever happened
    missing = [i for i in range(manifest.total) if i not in by_line]
    if missing:
        raise RuntimeError(f"job {manifest.job_id}: parts are missing lines {missing[:5]}")
    good = [by_line[i] for i in range(manifest.total) if by_line[i]["ok"]]
    bad = [by_line[i] for i in range(manifest.total) if not by_line[i]["ok"]]
    write_atomic(files.output, "".join(json.dumps(r["record"]) + "\n" for r in good).encode())
    write_atomic(files.errors, "".join(json.dumps(r["record"]) + "\n" for r in bad).encode())
    completion = Completion(
        job_id=manifest.job_id,
        output_file=files.output.uri,
        error_file=files.errors.uri,
        request_counts={"total": manifest.total, "completed": len(good), "failed": len(bad)},
        event_id=completed_event_id(manifest),
    )
    write_atomic(files.result, json.dumps(asdict(completion)).encode())
    metrics.job("completed")
    return completion

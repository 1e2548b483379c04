"""Where the OpenAI Files and Batches API keeps its state: in the configured storage, never in a replica.

Layout under ``--batch_store`` (every replica must share it)::

    files/<file_id>.json      file object (+ ``location``: where its bytes are)
    files/<file_id>.data      uploaded bytes (batch inputs)
    file-index/<key>          empty: one per file, names sort newest first (listing reads only a page)
    batches/<batch_id>.json   batch record: the OpenAI fields fixed at creation + where its job lives
    batch-index/<key>         empty: one per batch, names sort newest first
    active/<batch_id>         empty: the job has not completed (a restarted local server resumes these)
    jobs/<batch_id>/...       the job of an HTTP batch (batch.JobFiles); event jobs keep their own output

A batch's changing state (status, counts, output files) is read from its job's files, so an HTTP batch
and a ``batch.submitted`` job are one kind of job, visible to every replica.
"""

from __future__ import annotations

import json
import re
import time
import uuid
from typing import Any

from .storage import Location, exists, listdir, read_bytes, remove, write_atomic

FILE_ID = re.compile(r"^file-[A-Za-z0-9_-]{1,64}$")
BATCH_ID = re.compile(r"^batch_[A-Za-z0-9_-]{1,64}$")
_NEWEST_FIRST = 10**16  # microseconds until year 2286: index keys are (this - created), zero-padded


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex[:24]


def new_batch_id() -> str:
    return "batch_" + uuid.uuid4().hex[:24]


def _index_key(created_us: int, id_: str) -> str:
    return f"{_NEWEST_FIRST - created_us:017d}-{id_}"


def _names(index: Location, after_key: str | None, oldest_first: bool = False) -> list[str]:
    """Index entry names after ``after_key``, newest first or oldest first (one listing)."""
    names = [n for n in listdir(index) if not n.startswith(".")]  # sorted: newest first
    if oldest_first:
        names.reverse()
        return names if after_key is None else [n for n in names if n < after_key]
    return names if after_key is None else [n for n in names if n > after_key]


def _page(
    index: Location, after_key: str | None, limit: int, oldest_first: bool = False
) -> tuple[list[str], bool]:
    """Ids of up to ``limit`` entries after ``after_key`` and whether more follow: one listing of names,
    no object read."""
    page = _names(index, after_key, oldest_first)[: limit + 1]
    return [n.split("-", 1)[1] for n in page[:limit]], len(page) > limit


class BatchStore:
    def __init__(self, root: Location):
        self.root = root
        self.files = root.child("files")
        self.file_index = root.child("file-index")
        self.batches = root.child("batches")
        self.batch_index = root.child("batch-index")
        self.active = root.child("active")
        self.jobs = root.child("jobs")

    # Files -----------------------------------------------------------------------------------------
    def add_file(
        self,
        filename: str,
        purpose: str,
        *,
        data: bytes | None = None,
        location: Location | None = None,
        size: int | None = None,
        file_id: str | None = None,
    ) -> dict[str, Any]:
        """Store uploaded ``data``, or register bytes that live elsewhere (a job's input or output)."""
        file_id = file_id or new_file_id()
        now_us = time.time_ns() // 1000
        if data is not None:
            location = self.files.child(f"{file_id}.data")
            write_atomic(location, data)
            size = len(data)
        assert location is not None
        obj = {
            "id": file_id,
            "object": "file",
            "bytes": size or 0,
            "created_at": now_us // 1_000_000,
            "filename": filename,
            "purpose": purpose,
            "status": "processed",
            "status_details": None,
            "expires_at": None,
            "location": location.uri,
            "created_us": now_us,
        }
        # Index entry first: a listed id whose object is missing is skipped; an unlisted object is lost.
        write_atomic(self.file_index.child(_index_key(now_us, file_id)), b"")
        write_atomic(self.files.child(f"{file_id}.json"), json.dumps(obj).encode())
        return obj

    def file(self, file_id: str) -> dict[str, Any] | None:
        loc = self.files.child(f"{file_id}.json")
        if not FILE_ID.match(file_id) or not exists(loc):
            return None
        obj: dict[str, Any] = json.loads(read_bytes(loc))
        return obj

    def list_files(
        self, after: str | None, limit: int, purpose: str | None = None, oldest_first: bool = False
    ) -> tuple[list[dict[str, Any]], bool]:
        """Newest first (OpenAI's default order) or oldest first; with ``purpose``, a full page of that
        purpose. Files are read until one more than ``limit`` match, so ``has_more`` is exact."""
        after_key = None
        if after is not None:
            obj = self.file(after)
            after_key = _index_key(obj["created_us"], after) if obj else None
        found: list[dict[str, Any]] = []
        for name in _names(self.file_index, after_key, oldest_first):
            f = self.file(name.split("-", 1)[1])
            # Skipped: a file being added or deleted, and an entry its object no longer names (two
            # replicas or threads registering the same output file each write one; the object's wins).
            if f is None or name != _index_key(f["created_us"], f["id"]):
                continue
            if purpose is not None and f["purpose"] != purpose:
                continue
            if len(found) == limit:
                return found, True
            found.append(f)
        return found, False

    def delete_file(self, obj: dict[str, Any]) -> None:
        file_id = obj["id"]
        for loc in (
            self.files.child(f"{file_id}.json"),
            self.file_index.child(_index_key(obj["created_us"], file_id)),
        ):
            remove(loc)
        data = self.files.child(f"{file_id}.data")
        if obj["location"] == data.uri:
            remove(data)

    # Batches ---------------------------------------------------------------------------------------
    def put_batch(self, record: dict[str, Any]) -> None:
        write_atomic(self.batch_index.child(_index_key(record["created_us"], record["id"])), b"")
        write_atomic(self.batches.child(f"{record['id']}.json"), json.dumps(record).encode())

    def batch(self, batch_id: str) -> dict[str, Any] | None:
        loc = self.batches.child(f"{batch_id}.json")
        if not BATCH_ID.match(batch_id) or not exists(loc):
            return None
        obj: dict[str, Any] = json.loads(read_bytes(loc))
        return obj

    def list_batches(self, after: str | None, limit: int) -> tuple[list[dict[str, Any]], bool]:
        after_key = None
        if after is not None:
            rec = self.batch(after)
            after_key = _index_key(rec["created_us"], after) if rec else None
        ids, more = _page(self.batch_index, after_key, limit)
        return [b for b in (self.batch(i) for i in ids) if b is not None], more

    def delete_batch(self, record: dict[str, Any]) -> None:
        """Forget a batch whose creation failed half-way (its job is left to the cancel marker)."""
        for loc in (
            self.batch_index.child(_index_key(record["created_us"], record["id"])),
            self.batches.child(f"{record['id']}.json"),
            self.active.child(record["id"]),
        ):
            remove(loc)

    def set_active(self, batch_id: str, active: bool) -> None:
        marker = self.active.child(batch_id)
        if active:
            write_atomic(marker, b"")
        else:
            remove(marker)

    def active_ids(self) -> list[str]:
        return [n for n in listdir(self.active) if BATCH_ID.match(n)]

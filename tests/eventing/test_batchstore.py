"""The Files/Batches store's listing, against index entries left by racing registrations."""

from __future__ import annotations

import time
from pathlib import Path

from eventing.batchstore import BatchStore
from eventing.storage import Storage


def _store(tmp_path: Path) -> BatchStore:
    return BatchStore(Storage([tmp_path]).resolve(str(tmp_path / "store"), write=True))


def test_a_file_registered_twice_is_listed_once(tmp_path: Path) -> None:
    store = _store(tmp_path)
    upload = store.add_file("in.jsonl", "batch", data=b"{}\n")
    output = store.root.child("out.jsonl")
    # Two replicas (or threads) register the same batch's output file, each writing an index entry.
    first = store.add_file("b_output.jsonl", "batch_output", location=output, size=3, file_id="file-out")
    time.sleep(0.002)
    second = store.add_file("b_output.jsonl", "batch_output", location=output, size=3, file_id="file-out")
    assert first["created_us"] != second["created_us"]

    for oldest_first in (False, True):
        files, more = store.list_files(None, 10, oldest_first=oldest_first)
        assert sorted(f["id"] for f in files) == sorted([upload["id"], "file-out"]) and not more
    files, more = store.list_files(None, 1, purpose="batch_output")
    assert [f["id"] for f in files] == ["file-out"] and not more
    files, more = store.list_files(None, 1)
    assert [f["id"] for f in files] == ["file-out"] and more  # newest first, the upload follows
    files, more = store.list_files("file-out", 1)
    assert [f["id"] for f in files] == [upload["id"]] and not more

    store.delete_file(second)
    files, more = store.list_files(None, 10)
    assert [f["id"] for f in files] == [upload["id"]] and not more

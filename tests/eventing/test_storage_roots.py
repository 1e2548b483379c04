"""Storage URIs: confinement of local paths to the configured roots, atomic writes (no engine)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from eventing.storage import Storage, StorageError, exists, listdir, read_bytes, write_atomic


def test_paths_inside_roots(tmp_path: Path) -> None:
    s = Storage([tmp_path])
    (tmp_path / "a.txt").write_text("x")
    for uri in (str(tmp_path / "a.txt"), f"file://{tmp_path}/a.txt", f"local://{tmp_path}/a.txt"):
        assert read_bytes(s.resolve(uri)) == b"x"
    assert s.resolve(str(tmp_path)).path == str(tmp_path.resolve())


@pytest.mark.parametrize(
    ("uri", "fragment"),
    [
        ("/etc/passwd", "outside the configured storage roots"),
        ("file:///etc/passwd", "outside"),
        ("{root}/../x", "'..' is not allowed"),
        ("file://{root}/sub/../../x", "'..'"),
        ("{root}/link/passwd", "outside"),  # symlink out of the root
        ("simplecache::file://{root}/a", "chained"),
        ("ftp://h/x", "unsupported storage scheme"),
        ("", "non-empty"),
    ],
)
def test_escapes_are_refused(tmp_path: Path, uri: str, fragment: str) -> None:
    (tmp_path / "link").symlink_to("/etc")
    with pytest.raises(StorageError, match=fragment.replace("(", r"\(")):
        Storage([tmp_path]).resolve(uri.format(root=tmp_path))


def test_no_roots_means_no_local_access(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="no local storage roots"):
        Storage([]).resolve(str(tmp_path))


def test_http_is_read_only(tmp_path: Path) -> None:
    with pytest.raises(StorageError, match="read-only"):
        Storage([tmp_path]).resolve("https://example.com/out", write=True)


def test_atomic_write_leaves_no_temp_files(tmp_path: Path) -> None:
    loc = Storage([tmp_path]).resolve(str(tmp_path / "d" / "f.jsonl"))
    write_atomic(loc, b"one")
    write_atomic(loc, b"two")
    assert read_bytes(loc) == b"two" and exists(loc)
    assert os.listdir(tmp_path / "d") == ["f.jsonl"]
    assert listdir(Storage([tmp_path]).resolve(str(tmp_path / "d"))) == ["f.jsonl"]


def test_memory_filesystem_round_trip(tmp_path: Path) -> None:
    loc = Storage([tmp_path]).resolve("memory://evllm-test/x/part.jsonl", write=True)
    write_atomic(loc, b"data")
    assert read_bytes(loc) == b"data" and exists(loc)
    with pytest.raises(StorageError, match="does not exist"):
        read_bytes(Storage([tmp_path]).resolve("memory://evllm-test/missing"))

"""Batch input/output through fsspec URIs, with local paths confined to configured roots.

Plain paths and ``file://`` URIs must resolve (symlinks included) inside one of ``--storage_roots``;
``..`` is refused outright. Remote filesystems (s3://, gs://, ...) are not confined: access there is
the service account's business. Chained URIs (``simplecache::file://...``) could wrap a local path and
are refused. Writes are atomic: local files via temp file + rename, object stores via one PUT.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import fsspec

from predictors.errors import InvalidInput

# http(s) is readable (inputs) but not writable; memory:// is in-process (tests, experiments).
REMOTE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "http", "https"}
)
READ_ONLY = frozenset({"http", "https"})


class StorageError(InvalidInput):
    """A URI that may not be used, or that cannot be read or written."""


@dataclass(frozen=True)
class Location:
    """One resolved URI: the filesystem, its path there, and the URI to show users."""

    fs: Any
    path: str
    uri: str
    local: bool

    def child(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return Location(self.fs, path, uri, self.local)


class Storage:
    def __init__(self, roots: Iterable[Path | str]):
        self.roots = [Path(os.path.realpath(Path(r).expanduser())) for r in roots]

    def resolve(self, uri: str, *, write: bool = False) -> Location:
        if not isinstance(uri, str) or not uri.strip():
            raise StorageError("storage URI must be a non-empty string")
        if "::" in uri:
            raise StorageError(f"chained fsspec URIs are not allowed: {uri!r}")
        parts = urlsplit(uri)
        scheme = parts.scheme.lower()
        if scheme in ("", "file", "local") or (len(scheme) == 1 and uri[1:3] in (":\\", ":/")):
            return self._local(parts.path if scheme in ("file", "local") else uri, uri)
        if scheme not in REMOTE_PROTOCOLS:
            raise StorageError(f"unsupported storage scheme {scheme!r} in {uri!r}")
        if write and scheme in READ_ONLY:
            raise StorageError(f"{scheme}:// is read-only here, cannot write {uri!r}")
        try:
            fs, path = fsspec.core.url_to_fs(uri)
        except (ImportError, ValueError) as exc:
            raise StorageError(f"cannot open {uri!r}: {exc}") from None
        return Location(fs, path, uri.rstrip("/"), local=False)

    def _local(self, raw: str, uri: str) -> Location:
        if ".." in Path(raw).parts:
            raise StorageError(f"'..' is not allowed in storage paths: {uri!r}")
        if not self.roots:
            raise StorageError("no local storage roots are configured (--storage_roots)")
        path = Path(os.path.realpath(Path(raw).expanduser()))
        if not any(path == root or path.is_relative_to(root) for root in self.roots):
            roots = ", ".join(str(r) for r in self.roots)
            raise StorageError(f"{uri!r} is outside the configured storage roots ({roots})")
        return Location(fsspec.filesystem("file"), str(path), uri.rstrip("/"), local=True)


def read_bytes(loc: Location) -> bytes:
    try:
        with loc.fs.open(loc.path, "rb") as fh:
            return bytes(fh.read())
    except FileNotFoundError:
        raise StorageError(f"{loc.uri} does not exist") from None
    except (OSError, ValueError) as exc:
        raise StorageError(f"cannot read {loc.uri}: {exc}") from None


def exists(loc: Location) -> bool:
    try:
        return bool(loc.fs.exists(loc.path))
    except (OSError, ValueError):
        return False


def write_atomic(loc: Location, data: bytes) -> None:
    """Readers see the old content or all of ``data``, never a prefix (a crash leaves no torn file)."""
    if loc.local:
        directory = os.path.dirname(loc.path)
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, loc.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        return
    # Object stores make one PUT visible atomically; other fsspec backends write in one call.
    loc.fs.pipe_file(loc.path, data)


def listdir(loc: Location) -> list[str]:
    """Base names of the files directly under ``loc`` (empty when it does not exist)."""
    try:
        entries = loc.fs.ls(loc.path, detail=False)
    except (FileNotFoundError, NotADirectoryError):
        return []
    return sorted(os.path.basename(str(e).rstrip("/")) for e in entries)

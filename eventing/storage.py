"""Batch input/output through fsspec URIs, with local paths confined to configured roots.

Plain paths and ``file://`` URIs must resolve (symlinks included) inside one of ``--storage_roots``;
``..`` is refused outright. Remote filesystems (s3://, gs://, ...) are not confined: access there is
the service account's business. Chained URIs (``simplecache::file://...``) could wrap a local path and
are refused. Writes are atomic: local files via temp file + rename, object stores via one PUT.

Faults are classified, because a storage outage is not a bad request:

* ``StorageError`` (400; a job that meets it fails with its message): a URI that may not be used, an
  object that does not exist (``StorageNotFound``), access denied (``StorageForbidden``), a request
  the store calls invalid;
* ``StorageUnavailable`` (503; Knative redelivers the event, local jobs wait and retry): timeouts,
  5xx answers, dropped or refused connections, and any fault not known to be permanent. Every
  operation first retries these itself for ``--storage_retry_seconds`` with exponential backoff, on top
  of the storage client's own retries.

``exists()`` answers from a fresh lookup (never a listing another replica's writes made stale) and never
answers False for a fault.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import random
import tempfile
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import fsspec

from predictors.errors import InvalidInput, NotReady

logger = logging.getLogger("evllm.eventing")

T = TypeVar("T")

# http(s) is readable (inputs) but not writable; memory:// is in-process (tests, experiments).
REMOTE_PROTOCOLS = frozenset(
    {"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl", "memory", "http", "https"}
)
READ_ONLY = frozenset({"http", "https"})
# OSError numbers that say the request itself is wrong; retrying cannot help. s3fs maps S3 error
# codes onto these (InvalidBucketName, InvalidRequest -> EINVAL, MethodNotAllowed -> EPERM, 501 ->
# ENOSYS, redirects -> EREMCHG); 503 SlowDown is EBUSY and 500 is EREMOTEIO, both transient.
PERMANENT_ERRNOS = frozenset(
    getattr(errno, name)
    for name in ("EINVAL", "EPERM", "EACCES", "ENOSYS", "ENAMETOOLONG", "EROFS", "EREMCHG", "ENOTEMPTY")
    if hasattr(errno, name)
)


class StorageError(InvalidInput):
    """A URI that may not be used, or an object that cannot be read or written for good."""


class StorageNotFound(StorageError):
    """The object (or its bucket) does not exist."""


class StorageForbidden(StorageError):
    """The store refuses access to the location (credentials, bucket policy, read-only)."""


class StorageUnavailable(NotReady):
    """The store timed out, answered 5xx or dropped the connection: 503, so the event is redelivered
    (Knative retries 503, a 400 goes to the dead-letter sink and its job would never complete)."""


@dataclass(frozen=True)
class Retry:
    """In-process retries of transient faults for ``seconds`` in all (0: the client's own retries
    only): exponential backoff with jitter, from 1/20 of the budget (at most 0.5 s) up to 8 s a wait,
    so any budget gets a handful of attempts."""

    seconds: float = 30.0

    def call(self, what: str, uri: str, fn: Callable[[], T]) -> T:
        deadline = time.monotonic() + self.seconds
        delay = min(0.5, self.seconds / 20)
        attempt = 1
        while True:
            try:
                return fn()
            except Exception as exc:
                fault = classify(exc, what, uri)
                if not isinstance(fault, StorageUnavailable):
                    raise fault from exc
                left = deadline - time.monotonic()
                if left <= 0:
                    raise StorageUnavailable(
                        f"{fault.message} (after {attempt} attempts in {self.seconds:g}s)"
                    ) from exc
                wait = min(left, delay * random.uniform(0.5, 1.0))
                logger.info("storage: %s; retrying in %.2fs", fault.message, wait)
                time.sleep(wait)
                delay = min(delay * 2, 8.0)
                attempt += 1


def classify(exc: BaseException, what: str, uri: str) -> StorageError | StorageUnavailable:
    """A fault of ``what`` (``read``, ``write``, ...) on ``uri`` as a permanent StorageError or a
    transient StorageUnavailable. Unknown faults count as transient: a wrong guess there costs bounded
    redeliveries, a wrong guess the other way loses the job."""
    if isinstance(exc, (StorageError, StorageUnavailable)):
        return exc
    if isinstance(exc, (FileNotFoundError, NotADirectoryError)):
        return StorageNotFound(f"{uri} does not exist")
    if isinstance(exc, IsADirectoryError):
        return StorageError(f"{uri} is a directory, not a file")
    if isinstance(exc, PermissionError):
        return StorageForbidden(f"cannot {what} {uri}: access denied ({exc})")
    transient_os = isinstance(exc, (TimeoutError, ConnectionError))
    if isinstance(exc, OSError) and not transient_os and exc.errno in PERMANENT_ERRNOS:
        return StorageError(f"cannot {what} {uri}: {exc}")
    if isinstance(exc, ValueError):  # fsspec's word for a malformed path or URL
        return StorageError(f"cannot {what} {uri}: {exc}")
    # HTTP-based clients' own errors carry the status (aiohttp: status, gcsfs: code, Azure: status_code).
    status = next(
        (v for a in ("status", "code", "status_code") if isinstance(v := getattr(exc, a, None), int)), 0
    )
    if status in (401, 403):
        return StorageForbidden(f"cannot {what} {uri}: access denied ({status}: {exc})")
    if status in (404, 410):
        return StorageNotFound(f"{uri} does not exist")
    if 400 <= status < 500 and status not in (408, 429):
        return StorageError(f"cannot {what} {uri}: {status}: {exc}")
    return StorageUnavailable(f"storage unavailable: cannot {what} {uri}: {type(exc).__name__}: {exc}")


@dataclass(frozen=True)
class Location:
    """One resolved URI: the filesystem, its path there, and the URI to show users."""

    fs: Any
    path: str
    uri: str
    local: bool
    retry: Retry = field(default_factory=Retry, compare=False)

    def child(self, *parts: str) -> Location:
        path = "/".join([self.path.rstrip("/"), *parts])
        uri = "/".join([self.uri.rstrip("/"), *parts])
        return replace(self, path=path, uri=uri)


class Storage:
    def __init__(self, roots: Iterable[Path | str], *, retry: Retry | None = None):
        self.roots = [Path(os.path.realpath(Path(r).expanduser())) for r in roots]
        self.retry = retry or Retry()

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
        return Location(fs, path, uri.rstrip("/"), local=False, retry=self.retry)

    def _local(self, raw: str, uri: str) -> Location:
        if ".." in Path(raw).parts:
            raise StorageError(f"'..' is not allowed in storage paths: {uri!r}")
        if not self.roots:
            raise StorageError("no local storage roots are configured (--storage_roots)")
        path = Path(os.path.realpath(Path(raw).expanduser()))
        if not any(path == root or path.is_relative_to(root) for root in self.roots):
            roots = ", ".join(str(r) for r in self.roots)
            raise StorageForbidden(f"{uri!r} is outside the configured storage roots ({roots})")
        return Location(fsspec.filesystem("file"), str(path), uri.rstrip("/"), local=True, retry=self.retry)


def read_bytes(loc: Location) -> bytes:
    def read() -> bytes:
        with loc.fs.open(loc.path, "rb") as fh:
            return bytes(fh.read())

    return loc.retry.call("read", loc.uri, read)


def exists(loc: Location) -> bool:
    """True or False from a fresh lookup; a fault raises (fsspec's own ``exists`` answers False for any
    error, which would rerun finished chunks or call a written job unknown)."""

    def lookup() -> bool:
        loc.fs.invalidate_cache(loc.path)  # a cached listing would not show other replicas' writes
        try:
            loc.fs.info(loc.path)
        except FileNotFoundError:
            return False
        return True

    return loc.retry.call("look up", loc.uri, lookup)


def write_atomic(loc: Location, data: bytes) -> None:
    """Readers see the old content or all of ``data``, never a prefix (a crash leaves no torn file)."""
    if loc.local:
        loc.retry.call("write", loc.uri, lambda: _write_local(loc.path, data))
        return
    # Object stores make one PUT visible atomically; other fsspec backends write in one call. A PUT
    # retried after a dropped answer writes the same bytes again: harmless.
    loc.retry.call("write", loc.uri, lambda: loc.fs.pipe_file(loc.path, data))


def _write_local(path: str, data: bytes) -> None:
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def listdir(loc: Location) -> list[str]:
    """Base names of the files directly under ``loc`` (empty when it does not exist)."""

    def ls() -> list[str]:
        loc.fs.invalidate_cache(loc.path)
        try:
            entries = loc.fs.ls(loc.path, detail=False)
        except (FileNotFoundError, NotADirectoryError):
            return []
        return sorted(os.path.basename(str(e).rstrip("/")) for e in entries)

    return loc.retry.call("list", loc.uri, ls)


def size(loc: Location) -> int:
    """The size of the object at ``loc`` in bytes."""
    return loc.retry.call("look up", loc.uri, lambda: int(loc.fs.size(loc.path)))


def remove(loc: Location) -> None:
    """Delete the object at ``loc``; already gone is fine (a retried delete whose answer was lost)."""

    def rm() -> None:
        with contextlib.suppress(FileNotFoundError):
            loc.fs.rm(loc.path)

    loc.retry.call("delete", loc.uri, rm)

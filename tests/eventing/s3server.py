"""A real S3 API on localhost for the storage tests: moto in server mode (a subprocess on a free port),
and a fault-injecting reverse proxy in front of it that fails a fraction of the requests (503s,
dropped connections, answers slower than the client waits) or all of them for an outage.

The servers see only what the tests send them: no AWS account, no credentials files, no network.
"""

from __future__ import annotations

import collections
import contextlib
import http.client
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

FAULTS = ("503", "drop", "slow")
# The client's timeouts: generous by default (other tests may load the machine), short where a test
# injects slow answers (each costs one read timeout).
CONNECT_TIMEOUT = 2.0
READ_TIMEOUT = 5.0
SHORT_READ_TIMEOUT = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_env(tmp: Path) -> dict[str, str]:
    """No AWS settings from the machine: config and credentials files point at nothing."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(
        AWS_CONFIG_FILE=str(tmp / "aws-config"),
        AWS_SHARED_CREDENTIALS_FILE=str(tmp / "aws-credentials"),
        AWS_EC2_METADATA_DISABLED="true",
    )
    return env


@contextlib.contextmanager
def moto_server(tmp: Path) -> Iterator[str]:
    """moto's S3 in server mode (`python -m moto.server`): yields its URL, stops it afterwards."""
    port = free_port()
    log = (tmp / "moto.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        env=isolated_env(tmp),
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, (tmp / "moto.log").read_text()[-2000:]
            try:
                httpx.get(url + "/moto-api/", timeout=1)
                break
            except httpx.HTTPError:
                assert time.monotonic() < deadline, "moto server did not start"
                time.sleep(0.1)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


class FaultyProxy:
    """Forwards every HTTP request to ``upstream``; ``fraction`` of them fail instead, each with a fault
    drawn from ``faults``: ``503`` (an S3 ServiceUnavailable answer), ``drop`` (the connection closes
    without an answer; half of these after forwarding, so the store did the work and the client never
    heard) or ``slow`` (the answer comes after the client's read timeout). ``outage(seconds)``: every
    request meanwhile gets its connection dropped. ``counts`` tallies what happened."""

    def __init__(self, upstream: str, *, seed: int = 12) -> None:
        self.upstream = upstream.removeprefix("http://")
        self.fraction = 0.0
        self.faults: tuple[str, ...] = FAULTS
        self.slow_seconds = SHORT_READ_TIMEOUT + 0.2
        self.counts: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self._outage_until = 0.0
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect

            def handle_one_request(self) -> None:
                try:
                    super().handle_one_request()
                except (TimeoutError, ConnectionError):
                    self.close_connection = True

            def do_request(self) -> None:
                outer.serve(self)

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = do_request

            def log_message(self, *args: object) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def outage(self, seconds: float) -> None:
        self._outage_until = time.monotonic() + seconds

    def _fault(self) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if time.monotonic() < self._outage_until:
                fault: str | None = "outage"
            elif self._rng.random() < self.fraction:
                fault = self._rng.choice(self.faults)
                if fault == "drop" and self._rng.random() < 0.5:
                    fault = "drop-after"
            else:
                fault = None
            self.counts[fault or "forwarded"] += 1
            return fault

    def serve(self, req: BaseHTTPRequestHandler) -> None:
        body = _read_body(req)
        fault = self._fault()
        if fault in ("outage", "drop"):
            req.close_connection = True  # nothing written: the client sees the connection close
            return
        if fault == "503":
            _answer(req, 503, {"Content-Type": "application/xml"}, _S3_UNAVAILABLE)
            return
        if fault == "slow":
            time.sleep(self.slow_seconds)
        status, headers, payload = self._forward(req, body)
        if fault == "drop-after":
            req.close_connection = True
            return
        with contextlib.suppress(OSError):  # a slow answer's client may have gone
            _answer(req, status, headers, payload)

    def _forward(self, req: BaseHTTPRequestHandler, body: bytes) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection(self.upstream, timeout=30)
        try:
            conn.putrequest(req.command, req.path, skip_host=True, skip_accept_encoding=True)
            for name, value in req.headers.items():
                conn.putheader(name, value)
            conn.endheaders()
            if body:
                conn.send(body)
            resp = conn.getresponse()
            payload = resp.read()
            headers = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP_BY_HOP}
            if req.command != "HEAD":  # HEAD keeps the object's length; other answers are re-framed
                headers = {k: v for k, v in headers.items() if k.lower() != "content-length"}
                headers["Content-Length"] = str(len(payload))
            return resp.status, headers, payload
        finally:
            conn.close()


_HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "server", "date"}
_S3_UNAVAILABLE = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>ServiceUnavailable</Code>'
    b"<Message>Service is unable to handle request (injected by the test proxy).</Message></Error>"
)


def _read_body(req: BaseHTTPRequestHandler) -> bytes:
    """The request body exactly as sent (chunked framing included: it is forwarded as is)."""
    if req.headers.get("Transfer-Encoding", "").lower() == "chunked":
        raw = bytearray()
        while True:
            line = req.rfile.readline()
            raw += line
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while True:  # trailers, then the blank line
                    trailer = req.rfile.readline()
                    raw += trailer
                    if trailer in (b"\r\n", b"\n", b""):
                        return bytes(raw)
            raw += req.rfile.read(size + 2)
    return req.rfile.read(int(req.headers.get("Content-Length") or 0))


def _answer(req: BaseHTTPRequestHandler, status: int, headers: dict[str, Any], payload: bytes) -> None:
    req.send_response(status)
    for name, value in headers.items():
        req.send_header(name, value)
    if not any(k.lower() == "content-length" for k in headers):
        req.send_header("Content-Length", "0" if req.command == "HEAD" else str(len(payload)))
    req.end_headers()
    if req.command != "HEAD":
        req.wfile.write(payload)
    req.wfile.flush()


def s3_options(endpoint: str, *, read_timeout: float = READ_TIMEOUT) -> dict[str, Any]:
    """s3fs settings for the test store (what an operator puts in FSSPEC_S3): the endpoint, fixed
    credentials, and a short retry schedule so faults cost the tests seconds, not minutes."""
    return {
        "endpoint_url": endpoint,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
        # botocore's timeouts, and no retries of its own (its backoff waits up to seconds); s3fs still
        # retries dropped connections and timeouts (5 times, backoff from 0.1 s: a class attribute),
        # evllm retries the rest (--storage_retry_seconds)
        "config_kwargs": {
            "connect_timeout": CONNECT_TIMEOUT,
            "read_timeout": read_timeout,
            "retries": {"mode": "legacy", "max_attempts": 0},
        },
    }


def create_bucket(endpoint: str, name: str) -> None:
    import boto3

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    )
    client.create_bucket(Bucket=name)

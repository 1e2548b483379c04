"""Helpers for the in-process tests of tests/predictors (over tests/inprocess.py, never a real engine).

- `Blocking`: an in-process server on a private event loop, driven from plain functions (hypothesis and
  schemathesis generate cases synchronously; one server serves every case).
- `disconnecting`: a raw ASGI POST whose client goes away mid-request (httpx's ASGI transport only
  disconnects once the response is complete).
- `scrape` / `total`: Prometheus text to samples.
- JWT helpers: a JWKS file for an RSA key, and tokens signed with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import httpx
import jwt

from predictors.extension import Extension
from tests import inprocess

MODEL_NAME = inprocess.MODEL_NAME
ISSUER = "https://issuer.evllm.test"
AUDIENCE = "evllm-predictor"
KID = "test-key-1"

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")


def v2_body(
    prompts: Sequence[Any], parameters: dict[str, Any] | None = None, **tensor: Any
) -> dict[str, Any]:
    """A V2 infer request with one BYTES `text_input` tensor (fields overridable)."""
    t = {"name": "text_input", "datatype": "BYTES", "shape": [len(prompts)], "data": list(prompts), **tensor}
    body: dict[str, Any] = {"inputs": [t]}
    if parameters is not None:
        body["parameters"] = parameters
    return body


def sse_lines(text: str) -> list[str]:
    """Lines as SSE defines them: split on CR, LF or CRLF only (not str.splitlines' U+2028, \\x1c, ...,
    which JSON leaves unescaped in generated text)."""
    return re.split(r"\r\n|\r|\n", text)


def sse(text: str) -> list[dict[str, Any]]:
    """The JSON payloads of a server-sent event stream; anything but `data:` lines and blanks fails."""
    events = []
    for line in sse_lines(text):
        if line.startswith("data: "):
            events.append(json.loads(line.removeprefix("data: ")))
        else:
            assert line == "", line
    return events


def samples(text: str) -> dict[str, float]:
    out = {}
    for line in text.splitlines():
        m = SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def total(values: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in values.items() if k.split("{")[0] == name and all(w in k for w in want))


async def scrape(client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> dict[str, float]:
    r = await client.get("/metrics", headers=headers)
    assert r.status_code == 200, r.text
    return samples(r.text)


async def eventually(check: Callable[[], bool], timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.005)


class Blocking:
    """An in-process server and client on a private event loop, for synchronous callers."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, server: inprocess.InProcess, client: httpx.AsyncClient
    ):
        self.loop, self.server, self.client = loop, server, client

    def run(self, awaitable: Awaitable[Any]) -> Any:
        return self.loop.run_until_complete(awaitable)

    def request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        return self.run(self.client.request(method, url, **kwargs))

    def get(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("GET", url, **kwargs)

    def post(self, url: str, **kwargs: Any) -> httpx.Response:
        return self.request("POST", url, **kwargs)


@contextlib.contextmanager
def blocking(
    argv: Sequence[str] = (), *, extensions: Sequence[Extension] = (), headers: dict[str, str] | None = None
) -> Iterator[Blocking]:
    loop = asyncio.new_event_loop()
    cm = inprocess.server(argv, extensions=extensions)
    try:
        server = loop.run_until_complete(cm.__aenter__())
        client = server.client(headers=headers or {})
        try:
            yield Blocking(loop, server, client)
        finally:
            loop.run_until_complete(client.aclose())
            loop.run_until_complete(cm.__aexit__(None, None, None))
    finally:
        loop.close()


async def disconnecting(
    app: Any, path: str, body: dict[str, Any], *, request_id: str, leave_when: Callable[[], bool]
) -> list[dict[str, Any]]:
    """POST `body` to `path` as a client that disconnects once `leave_when()` holds; returns what the
    server sent before the app returned."""
    raw = json.dumps(body).encode()
    sent: list[dict[str, Any]] = []
    gone = asyncio.Event()
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": raw, "more_body": False}
        await gone.wait()
        return {"type": "http.disconnect"}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(raw)).encode()),
            (b"x-request-id", request_id.encode()),
        ],
        "client": ("127.0.0.1", 50000),
        "server": ("predictor", 80),
    }
    task = asyncio.ensure_future(app(scope, receive, send))
    await eventually(lambda: leave_when() or task.done())
    assert not task.done(), f"the request finished before the client left: {sent}"
    gone.set()
    await asyncio.wait_for(task, 5)
    return sent


# JWT --------------------------------------------------------------------------------------------------
def write_jwks(path: Path, private_key: Any, kid: str = KID) -> Path:
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(private_key.public_key()))
    jwk.update({"kid": kid, "use": "sig", "alg": "RS256"})
    path.write_text(json.dumps({"keys": [jwk]}))
    return path


def token(private_key: Any, *, kid: str = KID, algorithm: str = "RS256", **claims: Any) -> str:
    """A token for ISSUER/AUDIENCE, valid for a minute; a claim given as None is left out."""
    now = int(time.time())
    body = {"iss": ISSUER, "aud": AUDIENCE, "sub": "tester", "iat": now, "exp": now + 60, **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode(body, private_key, algorithm=algorithm, headers={"kid": kid})


def refused(path: str, status: int, needle: str, **request: Any) -> None:
    """One POST to a fresh in-process server is refused with ``status`` and a JSON error naming ``needle``,
    and nothing reached the engine."""

    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(path, **request)
            assert r.status_code == status, r.text
            assert needle in r.json()["error"]
            assert s.engine.fake.requests == []

    asyncio.run(main())

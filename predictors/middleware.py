"""ASGI middleware shared by every route: request context, metrics and access log, auth, body limits,
admission, online-load accounting and abort-on-disconnect. Extension routes are treated as their
`RoutePolicy` says (body limit, online or not)."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from . import logs, metrics, oip
from .admission import Admission
from .dataplane import DataPlane
from .errors import (
    EvllmError,
    InvalidInput,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RouteDisabled,
    Unauthorized,
    error_response,
)
from .extension import Policies
from .limits import OPENAI_GENERATION_PATHS, Limits


class OnlineLoad:
    """Counts online inference requests in flight, so background work can back off from them."""

    def __init__(self, app: ASGIApp, dataplane: DataPlane, policies: Policies):
        self.app = app
        self.dataplane = dataplane
        self.policies = policies

    def _online(self, path: str) -> bool:
        policy = self.policies.get(path)
        return policy is None or policy.online

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or not self._online(scope["path"]):
            await self.app(scope, receive, send)
            return
        with self.dataplane.online():
            await self.app(scope, receive, send)


# Observe gives each request a flag that AbortOnDisconnect raises when it drops a request whose client left,
# so that request is logged and counted as 499 (nginx's "client closed request"), not as a server error.
CLIENT_LEFT: contextvars.ContextVar[list[bool] | None] = contextvars.ContextVar(
    "evllm_client_left", default=None
)


class AbortOnDisconnect:
    """Cancel a POST's handler when its client goes away, which aborts its generation in the engine.

    Once the request body is read, the only message the server can still deliver is http.disconnect;
    a watcher waits for it and cancels the handler if the response is not complete yet. Later reads by
    the app (Starlette's StreamingResponse listens too) get the same disconnect message.

    The watcher (a task) starts only once the request has run `WATCH_AFTER` seconds, or when the app
    listens for the disconnect itself: most requests finish sooner and never pay for it (~75 us of the
    API server's CPU per request, measured), and a generation abandoned earlier costs the engine at
    most that long.
    """

    WATCH_AFTER = 0.5  # seconds

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        body_read = asyncio.Event()
        disconnect: asyncio.Future[Message] = loop.create_future()
        done = False
        client_left = False
        # The handler runs in this task; the watcher cancels it.
        handler = asyncio.current_task()
        assert handler is not None
        watcher: asyncio.Future[None] | None = None

        async def watch() -> None:
            nonlocal client_left
            await body_read.wait()
            if not disconnect.done():
                message = await receive()
                if not disconnect.done():
                    disconnect.set_result(message)
            if not done:
                client_left = True
                handler.cancel()

        def start_watching() -> None:
            nonlocal watcher
            if watcher is None:
                watcher = asyncio.ensure_future(watch())

        async def wrapped_receive() -> Message:
            if body_read.is_set():
                start_watching()
                return await asyncio.shield(disconnect)
            message = await receive()
            if message["type"] == "http.disconnect":
                if not disconnect.done():
                    disconnect.set_result(message)
                body_read.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def wrapped_send(message: Message) -> None:
            nonlocal done
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
            await send(message)

        timer = loop.call_later(self.WATCH_AFTER, start_watching)
        try:
            await self.app(scope, wrapped_receive, wrapped_send)
        except asyncio.CancelledError:
            # Cancelled because the client left: nothing to send, the engine request was aborted.
            # Any other cancellation (server shutdown) propagates.
            if not client_left or handler.uncancel() > 0:
                raise
            flag = CLIENT_LEFT.get()
            if flag is not None:
                flag[0] = True
        finally:
            timer.cancel()
            if watcher is not None:
                watcher.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await watcher


class JSONByDefault:
    """Treat a V1/V2 POST without Content-Type as JSON.

    tritonclient sends JSON infer requests without a Content-Type; FastAPI then refuses to parse the body,
    and kserve's V2 route mistakes it for a binary-tensor request. Binary-tensor requests (which carry
    Inference-Header-Content-Length) and every other path are left alone.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] == "http"
            and scope["method"] == "POST"
            and scope["path"].startswith(("/v1/", "/v2/"))
            and not any(
                k in (b"content-type", b"inference-header-content-length") for k, _ in scope["headers"]
            )
        ):
            scope = {**scope, "headers": [*scope["headers"], (b"content-type", b"application/json")]}
        await self.app(scope, receive, send)


# Hardening and observability (outermost first: Observe > Authenticate > BodyLimit > Admit) -----------
async def _refuse(exc: EvllmError, scope: Scope, receive: Receive, send: Send) -> None:
    await error_response(exc)(scope, receive, send)


def _headers(scope: Scope, only: frozenset[bytes] | None = None) -> dict[str, str]:
    """The request's headers by lower-cased name; `only` those named (decoding every header of every
    request showed up in the hot path)."""
    return {
        k.decode("latin-1").lower(): v.decode("latin-1")
        for k, v in scope["headers"]
        if only is None or k.lower() in only
    }


_OBSERVED = frozenset({b"x-request-id", b"ce-id", b"traceparent"})
_CONTENT_LENGTH = frozenset({b"content-length"})


class Observe:
    """Per request: request id (echoed as X-Request-Id, given to the engine), CloudEvent id and traceparent
    in the log context; latency, status and in-flight metrics; one access log line without any body.

    Every request of every protocol passes here, and under load its bookkeeping was as costly as all the
    other middleware together (bench/results/2026-12-05-ablation): it does only what it must per request.
    """

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = _headers(scope, _OBSERVED)
        given = headers.get("x-request-id")
        request_id = logs.safe_id(given)
        if request_id is None:
            # As uuid4().hex without building a UUID per request; not `random`, which a seed repeats.
            request_id = os.urandom(16).hex()
            raw = scope["headers"]
            if given is not None:
                raw = [(k, v) for k, v in raw if k.lower() != b"x-request-id"]
            # Handlers name the engine request after X-Request-Id: logs and engine then agree.
            scope = {**scope, "headers": [*raw, (b"x-request-id", request_id.encode())]}
        echoed = (b"x-request-id", request_id.encode())
        token = logs.CONTEXT.set(
            logs.RequestContext(
                request_id,
                logs.safe_id(headers.get("ce-id")),
                logs.safe_traceparent(headers.get("traceparent")),
            )
        )
        method, path = scope["method"], scope["path"]
        protocol = metrics.protocol_of(method, path)
        proto_token = metrics.PROTOCOL.set(protocol)
        model = metrics.model()
        # The model the request's generations used (an adapter's name, filled in by the engine hook).
        used = metrics.RequestModel(model)
        model_token = metrics.REQUEST_MODEL.set(used)
        client_left = [False]
        left_token = CLIENT_LEFT.set(client_left)
        status = 500  # what the client sees if the app dies before answering (uvicorn sends a 500)
        sent = 0
        started = False

        async def observed_send(message: Message) -> None:
            nonlocal status, sent, started
            if message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            elif message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()), echoed]}
            await send(message)

        in_flight = metrics.child(metrics.IN_FLIGHT, model, protocol)
        in_flight.inc()
        start = time.monotonic()
        try:
            await self.app(scope, receive, observed_send)
        finally:
            elapsed = time.monotonic() - start
            CLIENT_LEFT.reset(left_token)
            if client_left[0] and not started:
                status = 499  # nothing was answered: the client went away first
            in_flight.dec()
            metrics.child(metrics.REQUEST_DURATION, used.name, protocol).observe(elapsed)
            metrics.child(metrics.REQUESTS, used.name, protocol, str(status)).inc()
            if path not in QUIET_PATHS:
                logs.access(
                    "%s %s %d",
                    (method, path, status),
                    {
                        "method": method,
                        "path": path,
                        "status": status,
                        "protocol": protocol,
                        "duration_ms": round(elapsed * 1000, 2),
                        "response_bytes": sent,
                        "client": (scope.get("client") or ("", 0))[0],
                    },
                )
            metrics.REQUEST_MODEL.reset(model_token)
            metrics.PROTOCOL.reset(proto_token)
            logs.CONTEXT.reset(token)


# Probes and scrapes every few seconds would drown the access log.
QUIET_PATHS = frozenset({"/metrics", "/v2/health/live", "/v2/health/ready", "/"})


class Authenticate:
    """401 with a JSON error unless the request carries a valid API key or JWT (when auth is configured)."""

    def __init__(self, app: ASGIApp, authenticator: Any):
        self.app = app
        self.authenticator = authenticator

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and self.authenticator.required(scope["path"]):
            try:
                self.authenticator.check(_headers(scope))
            except Unauthorized as exc:
                metrics.rejected("unauthorized")
                exc.headers = {"WWW-Authenticate": 'Bearer realm="evllm"'}
                await _refuse(exc, scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodyLimit:
    """413 for a body over the limit, judged by Content-Length when sent and by the bytes actually
    received otherwise (chunked uploads); the body is read here, bounded, and replayed to the app.
    OpenAI generation bodies are also checked for max_tokens above the limit (vLLM never sees those)."""

    def __init__(self, app: ASGIApp, limits: Limits, policies: Policies):
        self.app = app
        self.limits = limits
        self.policies = policies

    def _limit(self, path: str) -> int:
        policy = self.policies.get(path)
        if policy is not None and policy.max_body_bytes is not None:
            return policy.max_body_bytes
        return self.limits.max_request_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.app(scope, receive, send)
            return
        path = scope["path"]
        limit = self._limit(path)
        length = _headers(scope, _CONTENT_LENGTH).get("content-length")
        try:
            if length is not None and length.strip().isdigit():
                self.limits.check_body_size(int(length), limit)
            chunks: list[bytes] = []
            size = 0
            while True:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return  # nobody to answer
                body = message.get("body", b"")
                size += len(body)
                self.limits.check_body_size(size, limit)
                chunks.append(body)
                if not message.get("more_body", False):
                    break
            body = b"".join(chunks)
            if path in OPENAI_GENERATION_PATHS:
                self.limits.check_openai_body(body)
        except (PayloadTooLarge, InvalidInput) as exc:
            if isinstance(exc, PayloadTooLarge):
                metrics.rejected("payload_too_large")
            await _refuse(exc, scope, receive, send)
            return
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)


def _unsupported(path: str) -> str | None:
    # KServe's repository extension would unload our only model.
    if path.startswith("/v2/repository/"):
        return "the model repository extension is disabled"
    return None


def _route(scope: Scope) -> str | None:
    """Versioned V2 paths (the OIP spec's spelling) become the unversioned routes for the model's one
    version (KServe would answer them 501); the refusal for any other version or a disabled route."""
    try:
        path, query = oip.unversioned(scope["path"], scope.get("query_string", b""))
    except oip.UnknownVersion as exc:
        return str(exc)
    if path != scope["path"] or query != scope.get("query_string", b""):
        scope["path"], scope["raw_path"], scope["query_string"] = path, path.encode(), query
    return _unsupported(path)


class Admit:
    """Bounded admission for every POST (online inference and events): 429 past the limit, 503 draining.
    Routes KServe would answer with 501 or that would unload the model answer 404 (see `_route`)."""

    def __init__(self, app: ASGIApp, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = _route(scope)
        if refusal is not None:
            await _refuse(RouteDisabled(refusal), scope, receive, send)
            return
        if scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        try:
            self.admission.acquire()
        except (Overloaded, NotReady) as exc:
            await _refuse(exc, scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.admission.release()

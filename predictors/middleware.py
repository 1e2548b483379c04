"""ASGI middleware shared by every route: online-load accounting and abort-on-disconnect."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from .dataplane import DataPlane

Scope = dict[str, Any]

# Paths whose POSTs are not online inference (batch work is accounted by the executor, not here).
NOT_ONLINE = ("/events",)


class OnlineLoad:
    """Counts online inference requests in flight, so the batch executor can back off from them."""

    def __init__(self, app: Any, dataplane: DataPlane):
        self.app = app
        self.dataplane = dataplane

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].startswith(NOT_ONLINE):
            await self.app(scope, receive, send)
            return
        with self.dataplane.online():
            await self.app(scope, receive, send)


class AbortOnDisconnect:
    """Cancel a POST's handler when its client goes away, which aborts its generation in the engine.

    Once the request body is read, the only message the server can still deliver is http.disconnect;
    a watcher waits for it and cancels the handler if the response is not complete yet. Later reads by
    the app (Starlette's StreamingResponse listens too) get the same disconnect message.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        loop = asyncio.get_running_loop()
        body_read = asyncio.Event()
        disconnect: asyncio.Future[dict[str, Any]] = loop.create_future()
        done = False
        client_left = False

        async def wrapped_receive() -> dict[str, Any]:
            if body_read.is_set():
                return await asyncio.shield(disconnect)
            message = await receive()
            if message["type"] == "http.disconnect":
                if not disconnect.done():
                    disconnect.set_result(message)
                body_read.set()
            elif not message.get("more_body", False):
                body_read.set()
            return message

        async def wrapped_send(message: dict[str, Any]) -> None:
            nonlocal done
            if message["type"] == "http.response.body" and not message.get("more_body", False):
                done = True
            await send(message)

        handler = asyncio.ensure_future(self.app(scope, wrapped_receive, wrapped_send))

        async def watch() -> None:
            nonlocal client_left
            await body_read.wait()
            if not disconnect.done():
                message = await receive()
                if not disconnect.done():
                    disconnect.set_result(message)
            if not done and not handler.done():
                client_left = True
                handler.cancel()

        watcher = asyncio.ensure_future(watch())
        try:
            await handler
        except asyncio.CancelledError:
            # Cancelled because the client left: nothing to send, the engine request was aborted.
            # Any other cancellation (server shutdown) propagates.
            if not client_left:
                raise
        finally:
            watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watcher


class JSONByDefault:
    """Treat a V1/V2 POST without Content-Type as JSON.

    tritonclient sends JSON infer requests without a Content-Type; FastAPI then refuses to parse the body,
    and kserve's V2 route mistakes it for a binary-tensor request. Binary-tensor requests (which carry
    Inference-Header-Content-Length) and every other path are left alone.
    """

    def __init__(self, app: Any):
        self.app = app

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
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

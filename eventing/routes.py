"""``POST /events``: the predictor's Knative Trigger subscriber endpoint (binary or structured mode)."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response

from . import openai_api
from .config import EventingConfig
from .dataplane import DataPlaneView
from .events import encode, parse_http
from .handlers import Handlers

logger = logging.getLogger("evllm.eventing")

EVENTS_PATH = "/events"


def attach(app: FastAPI, dataplane: DataPlaneView, config: EventingConfig) -> Handlers:
    """Add ``POST /events`` and the OpenAI Files and Batches API to ``app`` (the server's body limit
    middleware enforces --max_event_bytes); unfinished local jobs resume at startup, background work
    stops with the app's shutdown."""
    handlers = Handlers(dataplane, config)
    if handlers.sink is not None:
        logger.info("K_SINK=%s: batch chunks are emitted as events", handlers.sink.url)

    @app.post(EVENTS_PATH, include_in_schema=False)
    async def events(request: Request) -> Response:
        # Errors are typed (BadEvent 400, NotReady 503, ...): the server's handlers map them to JSON.
        event = parse_http(request.headers, await request.body())
        reply = await handlers.handle(event)
        if reply.event is None:
            return Response(status_code=reply.status)
        headers, payload = encode(reply.event, binary=event.binary)
        return Response(payload, status_code=reply.status, headers=headers)

    openai_api.attach(app, handlers, dataplane.model_name)

    async def resume() -> None:
        handlers.background(handlers.resume())

    app.router.add_event_handler("startup", resume)
    app.router.add_event_handler("shutdown", handlers.close)
    return handlers

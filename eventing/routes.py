"""``POST /events``: the predictor's Knative Trigger subscriber endpoint (binary or structured mode)."""

from __future__ import annotations

import argparse
import logging
from typing import Any

from fastapi import FastAPI, Request, Response

from predictors.errors import EvllmError, PayloadTooLarge, error_response

from .config import EventingConfig
from .events import encode, parse_http
from .handlers import Handlers

logger = logging.getLogger("evllm.eventing")

EVENTS_PATH = "/events"
MAX_EVENT_BYTES = 64 * 1024 * 1024  # inline batch jobs can be large; bigger ones belong in storage


def attach(app: FastAPI, dataplane: Any, args: argparse.Namespace) -> Handlers:
    """Add ``POST /events`` to ``app``; background work stops with the app's shutdown."""
    handlers = Handlers(dataplane, EventingConfig.from_args(args))
    if handlers.sink is not None:
        logger.info("K_SINK=%s: batch chunks are emitted as events", handlers.sink.url)

    @app.post(EVENTS_PATH, include_in_schema=False)
    async def events(request: Request) -> Response:
        try:
            body = await request.body()
            limit = getattr(getattr(app.state, "evllm_limits", None), "max_event_bytes", MAX_EVENT_BYTES)
            if len(body) > limit:
                raise PayloadTooLarge(f"event is larger than {limit} bytes")
            event = parse_http(request.headers, body)
            reply = await handlers.handle(event)
        except EvllmError as exc:
            return error_response(exc)
        if reply.event is None:
            return Response(status_code=reply.status)
        headers, payload = encode(reply.event, binary=event.binary)
        return Response(payload, status_code=reply.status, headers=headers)

    app.router.add_event_handler("shutdown", handlers.close)
    return handlers

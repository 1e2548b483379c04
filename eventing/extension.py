"""Eventing as a server extension: its settings, ``POST /events`` and how the server treats it."""

from __future__ import annotations

from fastapi import FastAPI

from predictors.extension import RoutePolicy

from . import metrics, openai_api, routes
from .config import EventingConfig
from .dataplane import DataPlaneView


class Eventing:
    title = "eventing"
    description = "CloudEvents (POST /events), batch jobs, OpenAI Files + Batches API"
    settings = EventingConfig
    # Work done below online traffic (batch lines); /events' own label comes from its RoutePolicy.
    protocols: tuple[str, ...] = (metrics.BATCH_PROTOCOL,)

    def policies(self, settings: EventingConfig) -> list[RoutePolicy]:
        # Events are not online load: batch chunks arrive through them and must not slow themselves.
        return [
            RoutePolicy(
                routes.EVENTS_PATH,
                metrics.EVENTS_PROTOCOL,
                max_body_bytes=settings.max_event_bytes,
                online=False,
            ),
            # Uploads are as large as --max_file_bytes (the route answers OpenAI's 413 past it).
            RoutePolicy(
                openai_api.FILES_PATH,
                "openai",
                max_body_bytes=settings.max_file_bytes + openai_api.MULTIPART_SLACK,
                online=False,
            ),
            RoutePolicy(openai_api.BATCHES_PATH, "openai", online=False),
        ]

    def attach(self, app: FastAPI, dataplane: DataPlaneView, settings: EventingConfig) -> None:
        metrics.init()
        routes.attach(app, dataplane, settings)

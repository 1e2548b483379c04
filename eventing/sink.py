"""Emit events to K_SINK (the broker ingress a Knative SinkBinding injects)."""

from __future__ import annotations

from collections.abc import Iterable

import httpx
from cloudevents.http import CloudEvent

from predictors.errors import NotReady

from .events import encode


class Sink:
    def __init__(self, url: str, *, timeout: float = 30.0):
        self.url = url
        self._client: httpx.AsyncClient | None = None
        self.timeout = timeout

    def client(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(timeout=self.timeout)
        return self._client

    async def send(self, events: Iterable[CloudEvent]) -> None:
        """POST each event in binary mode (Knative's native mode); any failure raises NotReady (503),
        so the triggering delivery is retried and the (deterministic-id) events are sent again."""
        for event in events:
            headers, body = encode(event, binary=True)
            try:
                resp = await self.client().post(self.url, headers=headers, content=body)
            except httpx.HTTPError as exc:
                raise NotReady(f"cannot reach the event sink {self.url}: {exc}") from None
            if resp.status_code >= 300:
                raise NotReady(f"event sink {self.url} answered {resp.status_code}: {resp.text[:200]}")

    async def close(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

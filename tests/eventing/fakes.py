"""An engine-free stand-in for predictors.dataplane.DataPlane, and an ASGI app around /events."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
from fastapi import FastAPI

from eventing import config, routes
from predictors.errors import InvalidInput, NotReady

SHARED = Path(__file__).resolve().parents[2].parent / "shared"


@dataclass
class FakeGeneration:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class FakeDataPlane:
    """Echoes prompts; ``prompt == "bad"`` or max_tokens < 1 is a 400 from the OpenAI layer; records priorities."""

    model_name = "demo"

    def __init__(self, *, delay: float = 0.0):
        self._online = 0
        self.online_changed = asyncio.Event()
        self.delay = delay
        self.calls: list[tuple[str, Any, int]] = []
        self.generated: list[str] = []
        self.inflight = 0
        self.peak = 0
        self.not_ready = False

    @property
    def online_load(self) -> int:
        return self._online

    @contextlib.contextmanager
    def online(self) -> Iterator[None]:
        self._online += 1
        self.online_changed.set()
        try:
            yield
        finally:
            self._online -= 1
            self.online_changed.set()

    async def generate(self, prompt: str, params: Any, *, request_id: str | None = None, priority: int = 0,
                       error: type[InvalidInput] = InvalidInput) -> FakeGeneration:  # fmt: skip
        if self.not_ready:
            raise NotReady("Engine is starting, retry later.")
        self.generated.append(prompt)
        return FakeGeneration(prompt.upper(), [1, 2, 3], "length", len(prompt))

    async def openai_call(self, url: str, body: Any, *, priority: int = 0) -> tuple[int, dict[str, Any]]:
        if self.not_ready:
            raise NotReady("Engine is starting, retry later.")
        self.calls.append((url, body, priority))
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            await asyncio.sleep(self.delay)
        finally:
            self.inflight -= 1
        if body.get("prompt") == "bad" or (body.get("max_tokens") or 1) < 1:
            return 400, {
                "error": {"message": "max_tokens must be at least 1", "type": "BadRequestError", "code": 400}
            }
        if url == "/v1/chat/completions":
            text = body["messages"][-1]["content"].upper()
            return 200, {
                "id": "chatcmpl-1",
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": 3, "completion_tokens": 2},
            }  # fmt: skip
        return 200, {
            "id": f"cmpl-{len(self.calls)}",
            "choices": [{"text": str(body.get("prompt", "")).upper()}],
        }


def make_args(storage_root: Path, **overrides: Any) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    config.add_arguments(parser)
    args = parser.parse_args(["--storage_roots", str(storage_root)])
    for k, v in overrides.items():
        setattr(args, k, v)
    return args


@contextlib.asynccontextmanager
async def events_client(dataplane: FakeDataPlane, storage_root: Path, **overrides: Any):
    app = FastAPI()
    handlers = routes.attach(app, dataplane, make_args(storage_root, **overrides))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://predictor") as client:
        client.handlers = handlers  # type: ignore[attr-defined]
        try:
            yield client
        finally:
            await handlers.close()

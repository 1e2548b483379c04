"""An engine-free stand-in for predictors.dataplane.DataPlane, an ASGI app around /events, and an OpenAI
layer for the in-process server (tests/inprocess.py) that runs through its fake engine."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx
from fastapi import FastAPI

from eventing import routes
from eventing.config import EventingConfig
from predictors.errors import NotReady, install_handlers
from predictors.sampling import parse_parameters

if TYPE_CHECKING:
    from tests.inprocess import InProcess

# CloudEvents conformance cases, vendored beside these tests (cloudevents/SOURCES.md names the upstream).
CLOUDEVENTS_CASES = Path(__file__).resolve().parent / "cloudevents"


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
    """eventing.dataplane.DataPlaneView without an engine: echoes prompts upper-cased; ``prompt == "bad"``
    or max_tokens < 1 is a 400 from the OpenAI layer; records calls, priorities and the peak in flight.
    ``ready = False`` is an engine that is away (every call raises NotReady, as the real one does)."""

    model_name = "demo"

    def __init__(self, *, delay: float = 0.0, adapters: tuple[str, ...] = ()):
        self.adapters = adapters  # LoRA adapter names: their output is lower-cased
        self._online = 0
        self.online_changed = asyncio.Event()
        self.delay = delay
        self.ready = True
        self.calls: list[tuple[str, Any, int]] = []
        self.generated: list[str] = []
        self.inflight = 0
        self.peak = 0

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

    def model_names(self) -> list[str]:
        return [self.model_name, *self.adapters]

    async def generate(
        self,
        prompt: str,
        params: Any,
        *,
        request_id: str | None = None,
        priority: int = 0,
        model: str | None = None,
        logprobs: bool = False,
    ) -> FakeGeneration:
        if not self.ready:
            raise NotReady("Engine is starting, retry later.")
        self.generated.append(prompt)
        text = prompt.lower() if model in self.adapters else prompt.upper()
        return FakeGeneration(text, [1, 2, 3], "length", len(prompt))

    async def openai_call(self, url: str, body: Any, *, priority: int = 0) -> tuple[int, dict[str, Any]]:
        if not self.ready:
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


def make_config(storage_root: Path, **overrides: Any) -> EventingConfig:
    """The eventing settings of a server whose only storage root is ``storage_root``."""
    return EventingConfig(storage_roots=[str(storage_root)], **overrides)


@contextlib.asynccontextmanager
async def events_client(
    dataplane: FakeDataPlane, storage_root: Path, **overrides: Any
) -> AsyncIterator[httpx.AsyncClient]:
    """``POST /events`` alone on a bare app with the server's JSON error handlers but no middleware: the
    handlers' own behaviour. Body limits, auth, online load and metrics are the server's: tests of those
    use tests/inprocess.py with the Eventing extension (test_events_server.py)."""
    app = FastAPI()
    install_handlers(app)
    handlers = routes.attach(app, dataplane, make_config(storage_root, **overrides))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://predictor") as client:
        client.handlers = handlers  # type: ignore[attr-defined]
        try:
            yield client
        finally:
            await handlers.close()


@dataclass
class EngineCalls:
    """What the OpenAI layer saw: the online load at each call, and the most calls in flight at once."""

    online: list[int] = field(default_factory=list)
    inflight: int = 0
    peak: int = 0


def openai_through_engine(s: InProcess) -> EngineCalls:
    """vLLM's serving classes submit to the engine; so does this stand-in for them, so the engine hook
    (token counters, protocol label) and the fake engine (priorities) see every OpenAI-layer call."""
    calls = EngineCalls()

    async def call(url: str, body: Any, *, priority: int = 0) -> tuple[int, dict[str, Any]]:
        calls.online.append(s.dataplane.online_load)
        calls.inflight += 1
        calls.peak = max(calls.peak, calls.inflight)
        chat = url == "/v1/chat/completions"
        prompt = body["messages"][-1]["content"] if chat else body["prompt"]
        try:
            gen = await s.dataplane.generate(
                prompt, parse_parameters({"max_tokens": body.get("max_tokens")}), priority=priority
            )
        finally:
            calls.inflight -= 1
        usage = {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens}
        if chat:
            choice = {
                "index": 0,
                "message": {"role": "assistant", "content": gen.text},
                "finish_reason": "length",
            }
            return 200, {"id": "chatcmpl-1", "object": "chat.completion", "choices": [choice], "usage": usage}
        choice = {"index": 0, "text": gen.text, "finish_reason": "length"}
        return 200, {"id": "cmpl-1", "object": "text_completion", "choices": [choice], "usage": usage}

    s.openai.call = call  # type: ignore[method-assign]
    return calls

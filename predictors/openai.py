"""OpenAI completions/chat/models on the shared engine, served by vLLM's own serving classes.

vLLM's routers and serving objects are mounted as a sub-application under ``/openai`` (KServe's path), so
request validation, chat templates, sampling defaults, streaming and error shapes are exactly `vllm serve`'s,
and a newer vLLM in the GPU image brings its fixes along. Extensions call the same serving objects
in-process through `OpenAIServer.call`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.types import ASGIApp, Receive, Scope, Send

from .engine import Engine
from .errors import NotReady, error_response


class StartedGate:
    """The OpenAI sub-app behind the data plane's readiness: a JSON 503 until vLLM's serving state exists
    (its handlers fail with a 500 before) and while the engine is dead or draining."""

    def __init__(self, app: ASGIApp, check_ready: Callable[[], None]) -> None:
        self.app = app
        self.check_ready = check_ready

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                self.check_ready()
            except NotReady as exc:
                await error_response(exc)(scope, receive, send)
                return
        await self.app(scope, receive, send)


# The URLs `OpenAIServer.call` runs in-process (the OpenAI batch line's `url` vocabulary).
CALL_URLS = ("/v1/completions", "/v1/chat/completions")


def _error(status: int, message: str, kind: str = "BadRequestError") -> tuple[int, dict[str, Any]]:
    return status, {"error": {"message": message, "type": kind, "param": None, "code": status}}


class OpenAIServer:
    def __init__(self, engine: Engine):
        from vllm.entrypoints.openai.chat_completion.api_router import attach_router as chat_router
        from vllm.entrypoints.openai.completion.api_router import attach_router as completion_router
        from vllm.entrypoints.openai.models.api_router import attach_router as models_router
        from vllm.entrypoints.serve.exception_handling.register import init_exception_handler

        self.engine = engine
        self.app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
        self.app.state.args = engine.args
        completion_router(self.app)
        chat_router(self.app)
        models_router(self.app)
        init_exception_handler(self.app)

    async def start(self) -> None:
        """Build vLLM's serving state (models, renderer, completion/chat handlers) on the running engine."""
        from vllm.entrypoints.launchers.api_server.app_state import init_app_state

        await init_app_state(
            self.engine.client, self.app.state, self.engine.args, self.engine.supported_tasks
        )

    def serving_models(self) -> Any:
        """vLLM's registry of served names (base + adapters), once the engine started; else None."""
        return getattr(self.app.state, "openai_serving_models", None)

    async def call(self, url: str, body: Any, *, priority: int = 0) -> tuple[int, dict[str, Any]]:
        """Run one non-streaming OpenAI request in-process: (HTTP status, response or error body)."""
        from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
        from vllm.entrypoints.openai.completion.protocol import CompletionRequest
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.exceptions import VLLMClientError

        if url not in CALL_URLS:
            return _error(400, f"url must be one of {', '.join(CALL_URLS)}, got {url!r}")
        if not isinstance(body, dict):
            return _error(400, "body must be a JSON object")
        if body.get("stream"):
            return _error(400, "stream is not supported here")
        body = {**body, "priority": priority}
        state = self.app.state
        try:
            if url == "/v1/completions":
                request = CompletionRequest.model_validate(body)
                result = await state.openai_serving_completion.create_completion(request, None)
            else:
                request = ChatCompletionRequest.model_validate(body)
                result = await state.openai_serving_chat.create_chat_completion(request, None)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"])
            return _error(400, f"{where}: {first['msg']}" if where else first["msg"])
        except (VLLMClientError, ValueError, TypeError) as exc:
            return _error(400, str(exc))
        if isinstance(result, ErrorResponse):
            return int(result.error.code), result.model_dump()
        return 200, json.loads(result.model_dump_json())

"""The OIP generate extension (Triton-compatible): /generate and /generate_stream (server-sent events).

The generate spec answers validation errors with 422: this router maps the data plane's `InvalidInput`
to that once, at its edge (`_as_422`).
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse

from .dataplane import DataPlane
from .errors import EvllmError, InvalidInput, ValidationFailed
from .sampling import parse_parameters

logger = logging.getLogger("evllm.generate")


@contextlib.contextmanager
def _as_422() -> Iterator[None]:
    try:
        yield
    except ValidationFailed:
        raise
    except InvalidInput as exc:
        raise ValidationFailed(exc.message) from None


async def _read(request: Request, dataplane: DataPlane, model_name: str) -> tuple[str, Any, bool]:
    dataplane.check_model(model_name)
    try:
        body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise ValidationFailed("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValidationFailed("request body must be a JSON object")
    unknown = sorted(set(body) - {"text_input", "parameters", "id"})
    if unknown:
        raise ValidationFailed(f"unknown field(s): {', '.join(unknown)}")
    text = body.get("text_input")
    if not isinstance(text, str):
        raise ValidationFailed("text_input is required and must be a string")
    raw = body.get("parameters")
    details = bool(raw.get("details")) if isinstance(raw, dict) else False
    with _as_422():
        return text, parse_parameters(raw), details


def _chunk(payload: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(payload, ensure_ascii=False).encode() + b"\n\n"


def router(dataplane: DataPlane) -> APIRouter:
    api = APIRouter(tags=["generate"])

    async def generate(model_name: str, request: Request) -> JSONResponse:
        text, params, details = await _read(request, dataplane, model_name)
        with _as_422():
            g = await dataplane.generate(
                text, params, request_id=request.headers.get("x-request-id"), model=model_name
            )
        body: dict[str, Any] = {
            "model_name": model_name,
            "text_output": g.text,
            "finish_reason": g.finish_reason,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
        }
        if details:
            body["details"] = {"finish_reason": g.finish_reason, "logprobs": []}
        return JSONResponse(body)

    async def generate_stream(model_name: str, request: Request) -> StreamingResponse:
        text, params, _ = await _read(request, dataplane, model_name)
        with _as_422():
            deltas = await dataplane.prepare_stream(
                text, params, request_id=request.headers.get("x-request-id"), model=model_name
            )

        async def events() -> AsyncIterator[bytes]:
            completion_tokens = 0
            try:
                async for d in deltas:
                    completion_tokens += len(d.token_ids)
                    payload: dict[str, Any] = {
                        "model_name": model_name,
                        "text_output": d.text,
                        "finish_reason": d.finish_reason,
                    }
                    if d.finish_reason is not None:
                        payload["prompt_tokens"] = d.prompt_tokens
                        payload["completion_tokens"] = completion_tokens
                    yield _chunk(payload)
            except EvllmError as exc:
                # Headers are gone: the error travels in-band, as the generate extension specifies.
                yield _chunk({"error": exc.message})
            except Exception as exc:
                logger.exception("generate_stream failed")
                yield _chunk({"error": f"generation failed: {type(exc).__name__}"})

        return StreamingResponse(events(), media_type="text/event-stream")

    for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
        api.add_api_route(prefix + "/generate", generate, methods=["POST"], response_model=None)
        api.add_api_route(prefix + "/generate_stream", generate_stream, methods=["POST"], response_model=None)
    return api

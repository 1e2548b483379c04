"""The OIP generate extension (Triton-compatible): /generate and /generate_stream (server-sent events).

The generate spec answers validation errors with 422: this router maps the data plane's `InvalidInput`
to that once, at its edge (`_as_422`). Triton vLLM-backend clients' fields (`stream`,
`exclude_input_in_output`, `return_*`, `sampling_parameters`; see `triton`) are accepted at the top
level (Triton maps a generate request's fields to input tensors) or inside `parameters`.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from . import triton
from .dataplane import DataPlane, Delta, Generation
from .errors import EvllmError, InvalidInput, ValidationFailed
from .oip import MODEL_VERSION, add_lean_route
from .sampling import GenerateParameters, parse_parameters

logger = logging.getLogger("evllm.generate")

FIELDS = frozenset({"text_input", "parameters", "id"})
# The most negative float32: a logprob of -inf (a token sampled against a mask) is not valid JSON.
LOGPROB_FLOOR = -3.4028234663852886e38


@contextlib.contextmanager
def _as_422() -> Iterator[None]:
    try:
        yield
    except ValidationFailed:
        raise
    except InvalidInput as exc:
        raise ValidationFailed(exc.message) from None


@dataclass
class GenerateRequest:
    text: str
    params: GenerateParameters
    details: bool
    options: triton.Options

    @property
    def logprobs(self) -> bool:
        """The engine must report logprobs: for details, Triton's outputs, or top-k asked for."""
        return self.details or self.options.wants_logprob or self.params.logprobs is not None


async def _read(request: Request, dataplane: DataPlane, model_name: str) -> GenerateRequest:
    dataplane.check_model(model_name)
    try:
        body = orjson.loads(await request.body())
    except orjson.JSONDecodeError:
        raise ValidationFailed("request body is not valid JSON") from None
    if not isinstance(body, dict):
        raise ValidationFailed("request body must be a JSON object")
    unknown = sorted(set(body) - FIELDS - triton.NAMES)
    if unknown:
        raise ValidationFailed(f"unknown field(s): {', '.join(unknown)}")
    text = body.get("text_input")
    if not isinstance(text, str):
        raise ValidationFailed("text_input is required and must be a string")
    raw = body.get("parameters")
    if raw is not None and not isinstance(raw, dict):
        raise ValidationFailed("parameters must be a JSON object")
    raw = dict(raw or {})
    with _as_422():
        switches = {k: raw.pop(k) for k in triton.SWITCHES if k in raw}
        switches.update({k: body[k] for k in triton.SWITCHES if k in body})
        carried = body.get(triton.SAMPLING_PARAMETERS, raw.pop(triton.SAMPLING_PARAMETERS, None))
        if carried is not None:  # Triton: the tensor replaces the request's parameters
            transport = {k: v for k, v in raw.items() if k == "details"}
            raw = {**triton.sampling_parameters(carried), **transport}
        details = triton.as_bool("parameters.details", raw["details"]) if "details" in raw else False
        return GenerateRequest(text, parse_parameters(raw), details, triton.options(switches))


def _chunk(payload: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(payload) + b"\n\n"


def _token(token_id: int, position: Any, special: frozenset[int]) -> dict[str, Any]:
    """The generate spec's Token for a sampled token, from the engine's logprobs at its position."""
    lp = position[token_id]
    logprob = lp.logprob if math.isfinite(lp.logprob) else LOGPROB_FLOOR
    return {
        "id": token_id,
        "text": lp.decoded_token or "",
        "logprob": logprob,
        "special": token_id in special,
    }


def _tokens(g: Generation | Delta, special: frozenset[int]) -> list[dict[str, Any]]:
    if g.logprobs is None:
        return []
    return [_token(t, p, special) for t, p in zip(g.token_ids, g.logprobs, strict=True)]


def router(dataplane: DataPlane) -> APIRouter:
    api = APIRouter(tags=["generate"])

    async def generate(model_name: str, request: Request) -> Response:
        r = await _read(request, dataplane, model_name)
        with _as_422():
            if r.options.stream:
                raise InvalidInput("stream: true needs /generate_stream (or gRPC ModelStreamInfer)")
            g = await dataplane.generate(
                r.text,
                r.params,
                request_id=request.headers.get("x-request-id"),
                model=model_name,
                logprobs=r.logprobs,
            )
        body: dict[str, Any] = {
            "model_name": model_name,
            "model_version": MODEL_VERSION,
            "text_output": (r.text if r.options.prepend_input else "") + g.text,
            "finish_reason": g.finish_reason,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
            **triton.additional(r.options, g, top_logprobs=r.params.logprobs is not None),
        }
        if r.details:
            special = dataplane.special_token_ids()
            body["details"] = {"finish_reason": g.finish_reason, "logprobs": _tokens(g, special)}
        return Response(orjson.dumps(body), media_type="application/json")

    async def generate_stream(model_name: str, request: Request) -> StreamingResponse:
        r = await _read(request, dataplane, model_name)
        streaming = r.options.stream is not False  # Triton's `stream: false`: one event with everything
        with _as_422():
            r.options.check(streaming=streaming)
            deltas = await dataplane.prepare_stream(
                r.text,
                r.params,
                request_id=request.headers.get("x-request-id"),
                model=model_name,
                logprobs=r.logprobs,
            )
        special = dataplane.special_token_ids() if r.details else frozenset()
        top = r.params.logprobs is not None

        def payload(d: Delta, completion_tokens: int) -> dict[str, Any]:
            out: dict[str, Any] = {
                "model_name": model_name,
                "model_version": MODEL_VERSION,
                "text_output": (r.text if r.options.prepend_input else "") + d.text,
                "finish_reason": d.finish_reason,
                **triton.additional(r.options, d, top_logprobs=top),
            }
            if d.finish_reason is not None:
                out["prompt_tokens"] = d.prompt_tokens
                out["completion_tokens"] = completion_tokens
                if r.details and d.token_ids:
                    # The spec's StreamDetails needs a finish reason: the last event carries them.
                    out["details"] = {
                        "finish_reason": d.finish_reason,
                        "token": _token(d.token_ids[-1], (d.logprobs or [{}])[-1], special),
                    }
            return out

        async def events() -> AsyncIterator[bytes]:
            completion_tokens = 0
            whole: Delta | None = None
            try:
                async for d in deltas:
                    completion_tokens += len(d.token_ids)
                    if streaming:
                        yield _chunk(payload(d, completion_tokens))
                    elif whole is None:
                        whole = d
                    else:
                        whole.text += d.text
                        whole.token_ids += d.token_ids
                        if whole.logprobs is not None and d.logprobs is not None:
                            whole.logprobs += d.logprobs
                        whole.finish_reason, whole.cumulative_logprob = d.finish_reason, d.cumulative_logprob
                if whole is not None:
                    yield _chunk(payload(whole, completion_tokens))
            except EvllmError as exc:
                # Headers are gone: the error travels in-band, as the generate extension specifies.
                yield _chunk({"error": exc.message})
            except Exception as exc:
                logger.exception("generate_stream failed")
                yield _chunk({"error": f"generation failed: {type(exc).__name__}"})

        return StreamingResponse(events(), media_type="text/event-stream")

    for suffix, endpoint in (("/generate", generate), ("/generate_stream", generate_stream)):
        add_lean_route(api, "/v2/models/{model_name}" + suffix, endpoint)
        # What the OpenAPI schema shows. These FastAPI routes never answer: the lean route above comes
        # first, and the middleware turns the versioned spelling into the unversioned path
        # (middleware._route).
        for prefix in ("/v2/models/{model_name}", "/v2/models/{model_name}/versions/{model_version}"):
            api.add_api_route(prefix + suffix, endpoint, methods=["POST"], response_model=None)
    return api

"""Synchronous inference events: generate-shaped or chat data -> the reply event's data.

Client errors (bad data, bad parameters, prompt too long) raise InvalidInput -> HTTP 400: Knative does
not retry it and hands the event to the Trigger's deadLetterSink. Engine not ready / overloaded raise
503 / 429, which Knative retries with backoff.
"""

from __future__ import annotations

from typing import Any

from predictors.errors import InvalidInput, from_openai
from predictors.sampling import DEFAULT_MAX_TOKENS, parse_parameters

from . import catalog
from .dataplane import DataPlaneView


class BadData(InvalidInput):
    """The event's data does not fit its type's schema."""


async def infer(
    dataplane: DataPlaneView, data: Any, request_id: str, model: str | None = None
) -> dict[str, Any]:
    """``model``: the event's `model` extension (the base model or an adapter), None for the base."""
    name = model or dataplane.model_name
    if not isinstance(data, dict):
        raise BadData("inference.request data must be a JSON object with text_input or messages")
    if ("text_input" in data) == ("messages" in data):
        raise BadData("inference.request data needs exactly one of text_input or messages")
    catalog.check("inference.request", data, BadData)
    params = parse_parameters(data.get("parameters"))
    with dataplane.online():
        if "text_input" in data:
            gen = await dataplane.generate(data["text_input"], params, request_id=request_id, model=name)
            out: dict[str, Any] = {
                "model_name": name,
                "text_output": gen.text,
                "finish_reason": gen.finish_reason,
                "usage": {"prompt_tokens": gen.prompt_tokens, "completion_tokens": gen.completion_tokens},
            }
        else:
            # Same default length as the generate shape, not "until the context is full".
            body = {
                "model": name,
                "messages": data["messages"],
                "max_tokens": DEFAULT_MAX_TOKENS,
                **params.model_dump(exclude_none=True),
            }
            status, result = await dataplane.openai_call("/v1/chat/completions", body)
            if status != 200:
                raise from_openai(status, result)
            choice = result["choices"][0]
            usage = result.get("usage") or {}
            out = {
                "model_name": name,
                "text_output": choice["message"].get("content") or "",
                "finish_reason": choice.get("finish_reason"),
                "usage": {
                    "prompt_tokens": usage.get("prompt_tokens", 0),
                    "completion_tokens": usage.get("completion_tokens", 0),
                },
                "chat_completion": result,
            }
    if "id" in data:
        out["id"] = data["id"]
    return out

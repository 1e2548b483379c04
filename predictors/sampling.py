"""Request `parameters` (V2 infer, generate, V1, events) -> vLLM SamplingParams.

One typed, strict model for every protocol: unknown names and wrong types are client errors that
name the offending parameter, instead of surfacing later as engine failures.
"""

from __future__ import annotations

import difflib
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from .errors import InvalidInput

# Per the OIP generate extension spec (GenerateParameters.max_tokens default).
DEFAULT_MAX_TOKENS = 20

# Keys clients of KServe/Triton may send next to sampling parameters; they are not sampling choices.
TRANSPORT_KEYS = frozenset({"binary_data_output", "headers", "details", "timeout", "content_type"})


class GenerateParameters(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = Field(default=None, ge=1)
    min_tokens: int | None = Field(default=None, ge=0)
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = None
    min_p: float | None = Field(default=None, ge=0, le=1)
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    repetition_penalty: float | None = Field(default=None, gt=0)
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    bad_words: list[str] | None = None
    logprobs: int | None = Field(default=None, ge=0)  # top-k logprobs per generated token


KNOWN = sorted([*GenerateParameters.model_fields, *TRANSPORT_KEYS])


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors():
        name = ".".join(str(p) for p in err["loc"]) or "parameters"
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            # Unknown names are errors, never ignored: a typo (max_token) must not silently change nothing.
            close = difflib.get_close_matches(name, KNOWN, n=1)
            msg = "unknown parameter" + (f" (did you mean {close[0]}?)" if close else "")
        parts.append(f"parameters.{name}: {msg}")
    return "; ".join(parts)


def parse_parameters(raw: Any) -> GenerateParameters:
    if raw is None:
        return GenerateParameters()
    if not isinstance(raw, dict):
        raise InvalidInput("parameters must be a JSON object")
    clean = {k: v for k, v in raw.items() if k not in TRANSPORT_KEYS}
    try:
        return GenerateParameters.model_validate(clean)
    except ValidationError as exc:
        raise InvalidInput(_describe(exc)) from None


def to_sampling_params(
    params: GenerateParameters,
    defaults: dict[str, Any] | None = None,
    *,
    stream: bool = False,
) -> Any:
    """Build SamplingParams: the model's generation_config defaults, then the request's values."""
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind, SamplingParams

    kwargs: dict[str, Any] = dict(defaults or {})
    kwargs.update(params.model_dump(exclude_none=True))
    kwargs.setdefault("max_tokens", DEFAULT_MAX_TOKENS)
    # Streaming wants deltas; a single answer wants nothing until the end (cheapest for the engine).
    kwargs["output_kind"] = RequestOutputKind.DELTA if stream else RequestOutputKind.FINAL_ONLY
    # Built fresh per request: AsyncLLM need not deep-copy it (~23 us), as vLLM's OpenAI layer does.
    kwargs["skip_clone"] = True
    try:
        return SamplingParams.from_optional(**kwargs)
    except (ValueError, TypeError, VLLMClientError) as exc:
        raise InvalidInput(f"parameters: {exc}") from None

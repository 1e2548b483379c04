"""Request limits: body bytes, prompts per request, prompt tokens, max_tokens.

One `Limits` object per server (``DataPlane.limits``): the HTTP middleware enforces the byte limits (413)
before a handler reads anything; the data plane and the engine hook enforce the token and prompt-count
limits (400; the generate router answers 422, as the generate extension does for validation).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput, PayloadTooLarge
from .settings import setting

MiB = 1024 * 1024
OPENAI_GENERATION_PATHS = ("/openai/v1/completions", "/openai/v1/chat/completions")


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = setting(8 * MiB, "Largest request body (413 past it); routes may set their own.")
    max_prompts_per_request: int = setting(64, "Most prompts in one V2 infer / V1 predict request.")
    max_prompt_tokens: int | None = setting(
        None, "Most prompt tokens per request (unset: the model's context length)."
    )
    max_tokens_limit: int | None = setting(
        None,
        "Largest max_tokens a request may ask for; OpenAI requests that leave it unset get this "
        "(unset: the context length is the only limit).",
    )

    def check_body_size(self, size: int, limit: int) -> None:
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")

    def check_prompts(self, n: int) -> None:
        if n > self.max_prompts_per_request:
            raise InvalidInput(f"{n} prompts in one request; the limit is {self.max_prompts_per_request}")

    def check_prompt_tokens(self, n: int) -> None:
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise InvalidInput(f"prompt has {n} tokens; the limit is {self.max_prompt_tokens}")

    def check_max_tokens(self, n: int | None) -> None:
        if self.max_tokens_limit is not None and n is not None and n > self.max_tokens_limit:
            raise InvalidInput(f"max_tokens={n} is above the limit of {self.max_tokens_limit}")

    def apply_max_tokens(self, sampling_params: Any, requested: int | None) -> None:
        """A requested max_tokens above the limit is an error; an unset one (the default) is clamped."""
        if requested is not None:
            self.check_max_tokens(requested)
        elif self.max_tokens_limit is not None and (sampling_params.max_tokens or 0) > self.max_tokens_limit:
            sampling_params.max_tokens = self.max_tokens_limit

    def check_openai_body(self, body: bytes) -> None:
        """Explicit max_tokens / max_completion_tokens above the limit: 400 before vLLM runs anything.
        (Unset ones are clamped to the limit by the engine hook; bodies vLLM cannot parse get vLLM's 400.)"""
        if self.max_tokens_limit is None:
            return
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return
        self.check_openai_request(obj)

    def check_openai_request(self, obj: Any) -> None:
        """The same rule for OpenAI requests made in-process (batch lines, chat events)."""
        if self.max_tokens_limit is None or not isinstance(obj, dict):
            return
        for key in ("max_tokens", "max_completion_tokens"):
            value = obj.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > self.max_tokens_limit:
                raise InvalidInput(f"{key}={value} is above the limit of {self.max_tokens_limit}")

    def engine_check(self, engine_input: Any, sampling_params: Any) -> None:
        """Last line before the engine, for every path (OpenAI included): prompt tokens over the limit
        are refused; an unset max_tokens (OpenAI's "until the context is full") is clamped to the limit."""
        from vllm.exceptions import VLLMValidationError

        ids = engine_input.get("prompt_token_ids") if isinstance(engine_input, dict) else None
        if isinstance(ids, list) and self.max_prompt_tokens is not None and len(ids) > self.max_prompt_tokens:
            raise VLLMValidationError(
                f"prompt has {len(ids)} tokens; the limit is {self.max_prompt_tokens}",
                parameter="prompt",
            )
        if self.max_tokens_limit is not None and (sampling_params.max_tokens or 0) > self.max_tokens_limit:
            sampling_params.max_tokens = self.max_tokens_limit

"""Request limits: body bytes, prompts per request, prompt tokens, max_tokens, batch lines, event size.

One `Limits` object per server (``app.state.evllm_limits`` and ``DataPlane.limits``): the HTTP middleware
enforces the byte limits (413) before a handler reads anything; the data plane and the engine hook enforce
the token and prompt-count limits (400, or 422 on the generate extension, which answers validation with 422).
The eventing package reads ``max_batch_lines`` and ``max_event_bytes`` from the same object.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from typing import Any

from .errors import InvalidInput, PayloadTooLarge

MiB = 1024 * 1024
DEFAULT_MAX_REQUEST_BYTES = 8 * MiB
DEFAULT_MAX_EVENT_BYTES = 64 * MiB  # inline batch jobs ride in events; bigger ones belong in storage
DEFAULT_MAX_PROMPTS = 64
DEFAULT_MAX_BATCH_LINES = 50_000  # the OpenAI Batch API's per-file limit

EVENTS_PATH = "/events"
OPENAI_GENERATION_PATHS = ("/openai/v1/completions", "/openai/v1/chat/completions")


@dataclass(frozen=True)
class Limits:
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_event_bytes: int = DEFAULT_MAX_EVENT_BYTES
    max_prompts_per_request: int = DEFAULT_MAX_PROMPTS
    max_prompt_tokens: int | None = None  # None: the model's context length is the only limit
    max_tokens: int | None = None  # None: the context length is the only limit
    max_batch_lines: int = DEFAULT_MAX_BATCH_LINES

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> Limits:
        return cls(
            max_request_bytes=args.max_request_bytes,
            max_event_bytes=args.max_event_bytes,
            max_prompts_per_request=args.max_prompts_per_request,
            max_prompt_tokens=args.max_prompt_tokens,
            max_tokens=args.max_tokens_limit,
            max_batch_lines=args.max_batch_lines,
        )

    def body_limit(self, path: str) -> int:
        return self.max_event_bytes if path == EVENTS_PATH else self.max_request_bytes

    def check_body_size(self, path: str, size: int) -> None:
        limit = self.body_limit(path)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")

    def check_prompts(self, n: int, error: type[InvalidInput] = InvalidInput) -> None:
        if n > self.max_prompts_per_request:
            raise error(f"{n} prompts in one request; the limit is {self.max_prompts_per_request}")

    def check_prompt_tokens(self, n: int, error: type[InvalidInput] = InvalidInput) -> None:
        if self.max_prompt_tokens is not None and n > self.max_prompt_tokens:
            raise error(f"prompt has {n} tokens; the limit is {self.max_prompt_tokens}")

    def check_max_tokens(self, n: int | None, error: type[InvalidInput] = InvalidInput) -> None:
        if self.max_tokens is not None and n is not None and n > self.max_tokens:
            raise error(f"max_tokens={n} is above the limit of {self.max_tokens}")

    def apply_max_tokens(
        self, sampling_params: Any, requested: int | None, error: type[InvalidInput]
    ) -> None:
        """A requested max_tokens above the limit is an error; an unset one (the default) is clamped."""
        if requested is not None:
            self.check_max_tokens(requested, error)
        elif self.max_tokens is not None and (sampling_params.max_tokens or 0) > self.max_tokens:
            sampling_params.max_tokens = self.max_tokens

    def check_batch_lines(self, n: int, error: type[InvalidInput] = InvalidInput) -> None:
        if n > self.max_batch_lines:
            raise error(f"batch job has {n} lines; the limit is {self.max_batch_lines}")

    def check_openai_body(self, body: bytes) -> None:
        """Explicit max_tokens / max_completion_tokens above the limit: 400 before vLLM runs anything.
        (Unset ones are clamped to the limit by the engine hook; bodies vLLM cannot parse get vLLM's 400.)"""
        if self.max_tokens is None:
            return
        try:
            obj = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            return
        if not isinstance(obj, dict):
            return
        for key in ("max_tokens", "max_completion_tokens"):
            value = obj.get(key)
            if isinstance(value, int) and not isinstance(value, bool) and value > self.max_tokens:
                raise InvalidInput(f"{key}={value} is above the limit of {self.max_tokens}")

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
        if self.max_tokens is not None and (sampling_params.max_tokens or 0) > self.max_tokens:
            sampling_params.max_tokens = self.max_tokens


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("limits", "Request limits (400/413 with a JSON error past them)")
    group.add_argument(
        "--max_request_bytes",
        type=int,
        default=DEFAULT_MAX_REQUEST_BYTES,
        help=f"Largest request body on every route but /events (default {DEFAULT_MAX_REQUEST_BYTES}); 413 past it.",
    )
    group.add_argument(
        "--max_event_bytes",
        type=int,
        default=DEFAULT_MAX_EVENT_BYTES,
        help=f"Largest CloudEvent (body of POST /events, data included; default {DEFAULT_MAX_EVENT_BYTES}).",
    )
    group.add_argument(
        "--max_prompts_per_request",
        type=int,
        default=DEFAULT_MAX_PROMPTS,
        help=f"Most prompts in one V2 infer / V1 predict request (default {DEFAULT_MAX_PROMPTS}).",
    )
    group.add_argument(
        "--max_prompt_tokens",
        type=int,
        default=None,
        help="Most prompt tokens per request (default: the model's context length).",
    )
    group.add_argument(
        "--max_tokens_limit",
        type=int,
        default=None,
        help="Largest max_tokens a request may ask for; OpenAI requests that leave it unset get this "
        "(default: no limit beyond the context length).",
    )
    group.add_argument(
        "--max_batch_lines",
        type=int,
        default=DEFAULT_MAX_BATCH_LINES,
        help=f"Most lines in one batch job (default {DEFAULT_MAX_BATCH_LINES}).",
    )

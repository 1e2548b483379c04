"""Triton vLLM-backend conventions (github.com/triton-inference-server/vllm_backend, src/utils/request.py),
with Triton's meaning, for clients written against Triton: per-request switches sent as input tensors (V2
infer, gRPC) or as fields of a generate request, and the additional outputs they ask for.

- `stream`: deltas as they come (gRPC ModelStreamInfer, generate_stream) or one answer; unary transports
  cannot stream (a client error there), and generate_stream with `stream: false` sends one event.
- `exclude_input_in_output`: `false` prepends the prompt to `text_output` (refused when streaming, as in
  Triton). Unlike Triton, omitting it never prepends: evllm's and the generate spec's default.
- `return_finish_reason`, `return_num_input_tokens`, `return_num_output_tokens`: evllm always returns
  `finish_reason`, `prompt_tokens` and `completion_tokens`; the last two also add Triton's
  `num_input_tokens` / `num_output_tokens` (tokens of this response: the delta when streaming).
- `return_cumulative_logprob`: `cumulative_logprob` (evllm asks the engine for the sampled token's logprob).
- `return_logprobs`: `logprobs`, Triton's JSON string: per new token {token_id: {logprob, rank,
  decoded_token}}, `null` unless the sampling parameter `logprobs` (top-k) was given.
- `sampling_parameters`: a JSON object as a string, used instead of the request's `parameters` (Triton's
  workaround for clients that cannot send request parameters); values may be strings ("0.1", "100").
"""

from __future__ import annotations

import json
from dataclasses import dataclass, fields
from typing import Any

from .errors import InvalidInput

SWITCHES = (
    "stream",
    "exclude_input_in_output",
    "return_finish_reason",
    "return_cumulative_logprob",
    "return_logprobs",
    "return_num_input_tokens",
    "return_num_output_tokens",
)
SAMPLING_PARAMETERS = "sampling_parameters"
NAMES = frozenset((*SWITCHES, SAMPLING_PARAMETERS))


@dataclass(frozen=True)
class Options:
    stream: bool | None = None
    exclude_input_in_output: bool | None = None
    return_finish_reason: bool = False
    return_cumulative_logprob: bool = False
    return_logprobs: bool = False
    return_num_input_tokens: bool = False
    return_num_output_tokens: bool = False

    @property
    def prepend_input(self) -> bool:
        return self.exclude_input_in_output is False

    @property
    def wants_logprob(self) -> bool:
        """The engine must report the sampled tokens' logprobs."""
        return self.return_cumulative_logprob

    def check(self, *, streaming: bool) -> None:
        if streaming and self.prepend_input:
            raise InvalidInput("when streaming, `exclude_input_in_output` = false is not allowed")


def as_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    raise InvalidInput(f"{name} must be a boolean, got {value!r}")


def options(values: dict[str, Any]) -> Options:
    """Options from whatever carried them (generate fields, parameters, infer tensors' first element)."""
    kwargs = {f.name: as_bool(f.name, values[f.name]) for f in fields(Options) if f.name in values}
    return Options(**kwargs)


def sampling_parameters(value: Any) -> dict[str, Any]:
    """The `sampling_parameters` JSON string (or bytes) as a parameters object."""
    if isinstance(value, bytes):
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{SAMPLING_PARAMETERS} is not valid UTF-8") from None
    if isinstance(value, dict):
        return value
    try:
        parsed = json.loads(value) if isinstance(value, str) else None
    except ValueError:
        parsed = None
    if not isinstance(parsed, dict):
        raise InvalidInput(f"{SAMPLING_PARAMETERS} must be a JSON object (as a string)")
    return parsed


def logprobs_json(logprobs: list[dict[int, Any]] | None) -> str:
    """Triton's `logprobs` output: new tokens' top logprobs, or null when the request asked for none."""
    if logprobs is None:
        return "null"
    positions = [
        {
            str(t): {"logprob": lp.logprob, "rank": lp.rank, "decoded_token": lp.decoded_token}
            for t, lp in p.items()
        }
        for p in logprobs
    ]
    return json.dumps(positions)


def additional(opts: Options, g: Any, *, top_logprobs: bool) -> dict[str, Any]:
    """The additional outputs `opts` asks for, by Triton's output names, for one generation or delta `g`
    (the data plane's Generation or Delta); `top_logprobs`: the request asked for top-k logprobs."""
    out: dict[str, Any] = {}
    if opts.return_cumulative_logprob:
        out["cumulative_logprob"] = g.cumulative_logprob
    if opts.return_logprobs:
        out["logprobs"] = logprobs_json(g.logprobs if top_logprobs else None)
    if opts.return_num_input_tokens:
        out["num_input_tokens"] = g.prompt_tokens
    if opts.return_num_output_tokens:
        out["num_output_tokens"] = len(g.token_ids)
    return out

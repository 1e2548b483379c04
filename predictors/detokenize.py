"""A unary generation's text, decoded once at the end instead of once per engine step.

vLLM detokenizes every request incrementally, each engine step, so it can match stop strings and
stream text. A unary request without stop strings or logprobs needs neither: it runs with
`detokenize=False` and its text is decoded here once, with the DecodeStream vLLM's fast detokenizer
uses, primed with the prompt as vLLM primes it (so a first token's leading space comes out the same).
Measured on V2 generate (32 tokens, concurrency 16): ~0.13 ms less API server CPU per request.

Whatever the one-shot decode cannot settle (a trailing incomplete UTF-8 sequence, the tokenizers error
vLLM recovers from) is decoded by vLLM's own incremental detokenizer, token by token: the text is then
vLLM's by construction.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import tokenizers.decoders


def deferrable(tokenizer: Any, sampling_params: Any) -> bool:
    """Whether this request's text may be decoded once at the end (see the module's docstring)."""
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.detokenizer import uses_fast_detokenizer

    sp = sampling_params
    return (
        tokenizer is not None
        and uses_fast_detokenizer(tokenizer)
        and sp.detokenize
        and sp.output_kind == RequestOutputKind.FINAL_ONLY
        and not sp.stop
        and sp.logprobs is None
        and sp.prompt_logprobs is None
        # vLLM special-cases adjacent special tokens only when both of these are off.
        and (sp.skip_special_tokens or sp.spaces_between_special_tokens)
    )


def final_text(
    tokenizer: Any,
    sampling_params: Any,
    prompt_token_ids: list[int],
    token_ids: list[int],
    stop_terminated: bool,
) -> str:
    """The text vLLM's detokenizer would have produced for ``token_ids``. ``stop_terminated``: the engine
    stopped on EOS or a stop token id, which vLLM leaves out of the text unless
    `include_stop_str_in_output`."""
    sp = sampling_params
    ids = token_ids[:-1] if stop_terminated and not sp.include_stop_str_in_output else token_ids
    if not ids:
        return ""
    stream = tokenizers.decoders.DecodeStream(
        ids=prompt_token_ids, skip_special_tokens=sp.skip_special_tokens
    )
    try:
        text = stream.step(tokenizer._tokenizer, ids)
    except Exception:  # e.g. "Invalid prefix encountered": vLLM's detokenizer knows how to recover
        text = None
    if text is not None:
        return str(text)
    return _incremental(tokenizer, sp, prompt_token_ids, token_ids, stop_terminated)


def _incremental(
    tokenizer: Any, sp: Any, prompt_token_ids: list[int], token_ids: list[int], stop_terminated: bool
) -> str:
    from vllm.v1.engine.detokenizer import FastIncrementalDetokenizer

    request = SimpleNamespace(sampling_params=sp, request_id="final-text", prompt_token_ids=prompt_token_ids)
    detokenizer = FastIncrementalDetokenizer(tokenizer, request)
    detokenizer.update(list(token_ids), stop_terminated)
    return str(detokenizer.get_next_output_text(finished=True, delta=False))

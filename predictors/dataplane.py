"""The one data plane every transport calls: V2 infer, generate(_stream), V1 predict, OpenAI, and
whatever extensions build on it.

Transports only translate their wire format; prompts, sampling, priority, request ids, and the count of
online work in flight (which background work backs off from) all live here. Client mistakes raise
`InvalidInput`; each transport decides once what status that is on its wire.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from typing import Any

from . import detokenize
from .engine import Engine
from .errors import InvalidInput, ModelNotFound, NotReady
from .limits import Limits
from .openai import OpenAIServer
from .sampling import GenerateParameters, to_sampling_params

ONLINE_PRIORITY = 0


def finish_reason(output: Any) -> str | None:
    """vLLM's finish reason in the OIP generate vocabulary: length | eos_token | stop_sequence."""
    if output.finish_reason is None:
        return None
    if output.finish_reason == "length":
        return "length"
    if output.finish_reason == "stop":
        return "eos_token" if output.stop_reason is None else "stop_sequence"
    return str(output.finish_reason)


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    # Per generated token {token_id: vllm Logprob} (the sampled token and the requested top-k), and their
    # sum: only when the request asked the engine for logprobs.
    logprobs: list[Any] | None = None
    cumulative_logprob: float | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Delta:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    prompt_tokens: int
    logprobs: list[Any] | None = None  # this delta's tokens only
    cumulative_logprob: float | None = None  # of everything generated so far


def _fields(out: Any) -> tuple[str, list[int], str | None, int, list[Any] | None, float | None]:
    """A RequestOutput's first completion as Generation's (and Delta's) fields."""
    o = out.outputs[0]
    logprobs = None if o.logprobs is None else list(o.logprobs)
    return (
        o.text,
        list(o.token_ids),
        finish_reason(o),
        len(out.prompt_token_ids or ()),
        logprobs,
        o.cumulative_logprob,
    )


class DataPlane:
    def __init__(self, engine: Engine, model_name: str, openai: OpenAIServer | None = None):
        self.engine = engine
        self.model_name = model_name
        self.openai = openai if openai is not None else OpenAIServer(engine)
        self._online = 0
        self.online_changed = asyncio.Event()
        self._sampling_defaults: dict[str, Any] | None = None
        self.limits = Limits()  # the server replaces it with the configured one
        self.started = False  # the engine and vLLM's OpenAI serving state are up
        # Called with the AsyncLLM once it exists (metrics and limits wrap its generate).
        self.engine_hooks: list[Callable[[Any], None]] = []
        # Called with an adapter's name once it is loaded at runtime (metrics create its series).
        self.adapter_hooks: list[Callable[[str], None]] = []

    async def start(self) -> None:
        await self.engine.start()
        for hook in self.engine_hooks:
            hook(self.engine.client)
        await self.openai.start()
        # Ready only now: with the engine up but vLLM's serving state not yet built (adapters loading),
        # an OpenAI request would find no handler.
        self.started = True
        if self.engine.timeline is not None:
            self.engine.timeline.end("http_ready")

    @property
    def ready(self) -> bool:
        return self.started and self.engine.ready

    def check_ready(self) -> None:
        """NotReady (503) unless every protocol can answer."""
        self.engine.check_ready()
        if not self.started:
            raise NotReady("Engine is starting, retry later.")

    # Model names: the base model and its LoRA adapters -------------------------------------------
    def model_names(self) -> list[str]:
        """Every name this engine serves: the base model, then its adapters (vLLM's registry once the
        engine runs; before that, the adapters `--lora-modules` will load)."""
        registry = self.openai.serving_models()
        adapters = list(registry.lora_requests) if registry is not None else self.engine.static_adapters()
        return [self.model_name, *adapters]

    def not_found(self, name: str) -> ModelNotFound:
        served = ", ".join(self.model_names())
        return ModelNotFound(name, f"Model with name {name} does not exist. Served models: {served}.")

    def check_model(self, name: str) -> None:
        """ModelNotFound (404, naming the served models) unless ``name`` is served here."""
        if name != self.model_name and name not in self.model_names():
            raise self.not_found(name)

    def lora_request(self, name: str | None) -> Any:
        """The engine's LoRARequest for a model name: None for the base model."""
        if name is None or name == self.model_name:
            return None
        registry = self.openai.serving_models()
        request = registry.lora_requests.get(name) if registry is not None else None
        if request is None:
            raise self.not_found(name)
        return request

    def adapter_loaded(self, name: str) -> None:
        for hook in self.adapter_hooks:
            hook(name)

    # Online load, for the batch executor's backoff --------------------------------------------------
    @property
    def online_load(self) -> int:
        """Online requests in flight (running or waiting in the engine) on this replica."""
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

    # Generation ------------------------------------------------------------------------------------
    def _defaults(self) -> dict[str, Any]:
        # The model's generation_config.json defaults, as vLLM's OpenAI server applies them. Read once:
        # get_diff_sampling_param() reloads generation_config.json on every call (~15% of the API
        # server's CPU on V2 infer under load, measured with py-spy; bench/results/profiles).
        if self._sampling_defaults is None:
            self._sampling_defaults = dict(self.engine.client.model_config.get_diff_sampling_param())
        return self._sampling_defaults

    async def _inputs(self, prompts: list[str], max_tokens: int) -> list[Any]:
        for i, p in enumerate(prompts):
            if not isinstance(p, str):
                raise InvalidInput(f"prompt {i} must be a string")
            if not p:
                raise InvalidInput(f"prompt {i} is empty")
        inputs = await self.engine.tokenize(prompts, max_tokens)
        for x in inputs:
            ids = x.get("prompt_token_ids") if isinstance(x, dict) else None
            if isinstance(ids, list):
                self.limits.check_prompt_tokens(len(ids))
        return inputs

    async def _prepare(
        self, prompts: list[str], params: GenerateParameters, *, stream: bool, logprobs: bool = False
    ) -> tuple[Any, list[Any]]:
        """Every check a generation needs before it reaches the engine: readiness, limits, sampling
        parameters and tokenization. `logprobs`: report the sampled tokens' logprobs even when the
        parameters ask for no top-k (`details`, Triton's `return_cumulative_logprob`)."""
        self.engine.check_ready()
        self.limits.check_prompts(len(prompts))
        sp = to_sampling_params(params, self._defaults(), stream=stream)
        if logprobs and sp.logprobs is None:
            sp.logprobs = 0
        if detokenize.deferrable(self.tokenizer(), sp):
            sp.detokenize = False  # decoded once, at the end (`_final`)
        self.limits.apply_max_tokens(sp, params.max_tokens)
        return sp, await self._inputs(prompts, sp.max_tokens or 0)

    async def generate_many(
        self,
        prompts: list[str],
        params: GenerateParameters,
        *,
        request_id: str | None = None,
        priority: int = ONLINE_PRIORITY,
        model: str | None = None,
        logprobs: bool = False,
    ) -> list[Generation]:
        """Generate for N prompts concurrently (one engine request each) and return final outputs;
        ``model`` is the base model's name (or None) or an adapter's."""
        self.engine.check_ready()
        lora = self.lora_request(model)
        sp, inputs = await self._prepare(prompts, params, stream=False, logprobs=logprobs)
        rid = request_id or uuid.uuid4().hex

        async def one(i: int, engine_input: Any) -> Generation:
            final = None
            async for out in self.engine.generate(
                engine_input, sp, f"{rid}-{i}", priority=priority, lora_request=lora
            ):
                final = out
            assert final is not None
            return self._final(final, sp)

        if len(inputs) == 1:  # the common case: no task to schedule
            return [await one(0, inputs[0])]
        return list(await asyncio.gather(*(one(i, x) for i, x in enumerate(inputs))))

    async def generate(
        self,
        prompt: str,
        params: GenerateParameters,
        *,
        request_id: str | None = None,
        priority: int = ONLINE_PRIORITY,
        model: str | None = None,
        logprobs: bool = False,
    ) -> Generation:
        (result,) = await self.generate_many(
            [prompt], params, request_id=request_id, priority=priority, model=model, logprobs=logprobs
        )
        return result

    async def prepare_stream(
        self,
        prompt: str,
        params: GenerateParameters,
        *,
        request_id: str | None = None,
        priority: int = ONLINE_PRIORITY,
        model: str | None = None,
        logprobs: bool = False,
    ) -> AsyncIterator[Delta]:
        """Validate and tokenize now (so errors are a plain 4xx), then return the delta stream."""
        self.engine.check_ready()
        lora = self.lora_request(model)
        sp, (engine_input,) = await self._prepare([prompt], params, stream=True, logprobs=logprobs)
        rid = request_id or uuid.uuid4().hex

        async def stream() -> AsyncIterator[Delta]:
            async for out in self.engine.generate(
                engine_input, sp, rid, priority=priority, lora_request=lora
            ):
                yield Delta(*_fields(out))

        return stream()

    def _final(self, out: Any, sp: Any) -> Generation:
        g = Generation(*_fields(out))
        if not sp.detokenize:
            stopped = out.outputs[0].finish_reason == "stop"  # EOS or a stop token id: no stop strings
            g.text = detokenize.final_text(self.tokenizer(), sp, out.prompt_token_ids, g.token_ids, stopped)
        return g

    def tokenizer(self) -> Any:
        """The engine's tokenizer (None before the engine runs, or for an engine without one)."""
        return getattr(self.engine.client, "tokenizer", None)

    def special_token_ids(self) -> frozenset[int]:
        """The tokenizer's special tokens (the generate spec's `Token.special`)."""
        return frozenset(getattr(self.tokenizer(), "all_special_ids", None) or ())

    async def openai_call(
        self, url: str, body: Any, *, priority: int = ONLINE_PRIORITY
    ) -> tuple[int, dict[str, Any]]:
        """One non-streaming OpenAI completions/chat request through vLLM's serving classes, in-process:
        (HTTP status, response or error body)."""
        self.engine.check_ready()
        self.limits.check_openai_request(body)
        return await self.openai.call(url, body, priority=priority)

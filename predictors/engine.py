"""The one vLLM engine (AsyncLLM) of this process, built the way `vllm serve` builds it."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
from argparse import Namespace
from collections.abc import AsyncIterator
from typing import Any

from . import kv_cache
from .errors import EngineStartFailed, InvalidInput, NotReady
from .startup import EngineLog, StdoutTap, Timeline

logger = logging.getLogger("evllm.engine")

# Startup failures -> the flag to change, matched on the first words that identify them.
_START_HINTS = (
    (("memory", "kv cache", "kv_cache"), "--kv-cache-memory-bytes (or VLLM_CPU_KVCACHE_SPACE in GiB)"),
    (("max_model_len", "max-model-len", "context length"), "--max-model-len"),
    (("config.json", "no such file", "not a valid model", "repo id", "does not exist"), "--model_dir"),
    (("dtype",), "--dtype"),
)


def explain_start_failure(exc: BaseException) -> str:
    """One line: what failed and which flag changes it (the engine's traceback stays above it)."""
    if isinstance(exc, EngineStartFailed):
        return str(exc)
    text = " ".join(str(exc).split()) or type(exc).__name__
    low = text.lower()
    if "engine core initialization failed" in low:
        return (
            "the engine process failed during startup (its error is logged above); memory is the usual "
            "cause on CPU: set --kv-cache-memory-bytes or lower --max-model-len"
        )
    for words, flag in _START_HINTS:
        if any(w in low for w in words):
            return f"{text[:400]} (change {flag})"
    return text[:400]


# Prompts up to this many characters are tokenized on the event loop: for them the async renderer's hop
# through a thread pool costs more than the encoding (py-spy, V2 generate at c=16: ~18% of the API
# server's samples in that hop, 13% in creating its Future's Condition; the encoding itself ~4%).
# Longer prompts keep the thread pool so they never stall the loop.
INLINE_TOKENIZE_CHARS = 2048


class Engine:
    """Owns the AsyncLLM: start, health, and generation with vLLM's errors mapped to ours."""

    def __init__(
        self,
        args: Namespace,
        explicit_flags: frozenset[str] = frozenset(),
        timeline: Timeline | None = None,
    ):
        self.args = args
        self.explicit_flags = set(explicit_flags)  # engine flags the user gave (they beat our defaults)
        self.timeline = timeline  # the start's phases (None: not measured, e.g. in-process tests)
        self.client: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.supported_tasks: tuple[str, ...] = ()
        self.draining = False

    async def start(self) -> None:
        """Build the engine off the event loop, so health answers during a multi-minute GPU cold start.

        Same steps as `vllm serve`'s build_async_engine_client; vLLM supports constructing AsyncLLM
        outside the loop (its output handler then starts lazily: we start it right away instead).
        """
        from vllm import envs
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.entrypoints.launchers.cli_args import propagate_flash_late_interaction
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        from .stat_logger import BulkPrometheusStatLogger

        engine_args = AsyncEngineArgs.from_cli_args(self.args)
        propagate_flash_late_interaction(self.args, engine_args)
        usage = UsageContext.OPENAI_API_SERVER

        def build() -> Any:
            vllm_config = engine_args.create_engine_config(usage_context=usage)
            kv_cache.apply_cpu_default(vllm_config, self.explicit_flags)
            return AsyncLLM.from_vllm_config(
                vllm_config=vllm_config,
                usage_context=usage,
                enable_log_requests=engine_args.enable_log_requests,
                aggregate_engine_logging=engine_args.aggregate_engine_logging,
                disable_log_stats=engine_args.disable_log_stats,
                stat_loggers=[BulkPrometheusStatLogger],  # vLLM's vllm:* metrics, applied in bulk
            )

        client = await self._measured(build)
        # vLLM reads its settings from os.environ on every access until told to cache them, which its
        # engine core and workers do once up, but not its API server: here ~34 reads per 32-token
        # request (its per-step stats read one), 2.4 us each uncached, 0.4 us cached.
        envs.enable_envs_cache()
        # Start reading engine outputs now, so an engine failure is noticed before the first request.
        client._run_output_handler()
        await client.reset_mm_cache()
        self.client = client
        self.supported_tasks = tuple(await client.get_supported_tasks())
        logger.info("engine ready: model=%s max_model_len=%d", self.args.model, self.max_model_len)

    async def _measured(self, build: Any) -> Any:
        """Build the engine, cutting its phases at vLLM's own log lines (see `startup`)."""
        timeline = self.timeline
        if timeline is None:
            return await asyncio.to_thread(build)
        timeline.end("settings")
        engine_log = EngineLog(timeline.end)
        tap = StdoutTap(engine_log.feed)
        tap.open()
        try:
            client = await asyncio.to_thread(build)
        finally:
            tap.close()
        # The handshake can overtake the last lines on their way through the tap.
        for _ in range(20):
            if engine_log.done:
                break
            await asyncio.sleep(0.05)
        if not engine_log.done:
            logger.warning(
                "vLLM's startup log lines were not all seen: later engine phases count as kv_cache"
            )
        timeline.end("kv_cache")
        return client

    @property
    def ready(self) -> bool:
        return self.client is not None and not self.client.errored and not self.draining

    @property
    def dead(self) -> bool:
        return self.client is not None and self.client.errored

    def check_ready(self) -> None:
        if self.client is None:
            raise NotReady("Engine is starting, retry later.")
        if self.client.errored:
            raise NotReady("Engine is dead; the server will be restarted.")
        if self.draining:
            raise NotReady("Server is shutting down, retry on another replica.")

    @property
    def max_model_len(self) -> int:
        return int(self.client.model_config.max_model_len)

    async def tokenize(self, texts: list[str], max_tokens: int = 0) -> list[Any]:
        """Tokenize prompts with the engine's own renderer (what the OpenAI server does)."""
        from vllm.exceptions import VLLMClientError
        from vllm.renderers.inputs.preprocess import parse_model_prompt

        renderer = self.client.renderer
        # max_tokens is checked against the context here, with the name our clients use.
        try:
            params = dataclasses.replace(
                renderer.default_cmpl_tok_params,
                max_output_tokens=max_tokens,
                max_output_tokens_param="max_tokens",
            )
            prompts = [parse_model_prompt(self.client.model_config, {"prompt": t}) for t in texts]
            if sum(len(t) for t in texts) <= INLINE_TOKENIZE_CHARS:
                return list(renderer.render_cmpl(prompts, params))
            return list(await renderer.render_cmpl_async(prompts, params))
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise InvalidInput(str(exc)) from exc

    @property
    def lora_enabled(self) -> bool:
        return bool(getattr(self.args, "enable_lora", False))

    def static_adapters(self) -> list[str]:
        """The adapters `--lora-modules` names (vLLM loads them when the engine starts)."""
        return [m.name for m in getattr(self.args, "lora_modules", None) or ()]

    async def generate(
        self,
        engine_input: Any,
        sampling_params: Any,
        request_id: str,
        *,
        priority: int = 0,
        lora_request: Any = None,
    ) -> AsyncIterator[Any]:
        """Stream RequestOutputs; cancelling the consumer aborts the request in the engine."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        self.check_ready()
        try:
            async for out in self.client.generate(
                engine_input, sampling_params, request_id, priority=priority, lora_request=lora_request
            ):
                yield out
        except EngineDeadError as exc:
            raise NotReady("Engine is dead; the server will be restarted.") from exc
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise InvalidInput(str(exc)) from exc

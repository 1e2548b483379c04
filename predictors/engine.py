"""The one vLLM engine (AsyncLLM) of this process, built the way `vllm serve` builds it."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
from argparse import Namespace
from collections.abc import AsyncIterator
from typing import Any

from .errors import InvalidInput, NotReady

logger = logging.getLogger("evllm.engine")


class Engine:
    """Owns the AsyncLLM: start, health, and generation with vLLM's errors mapped to ours."""

    def __init__(self, args: Namespace):
        self.args = args
        self.client: Any = None  # vllm.v1.engine.async_llm.AsyncLLM once started
        self.supported_tasks: tuple[str, ...] = ()
        self._stack = contextlib.AsyncExitStack()
        self._started = asyncio.Event()
        self.draining = False

    async def start(self) -> None:
        # The same builder `vllm serve` uses, so engine flags mean exactly what they mean there.
        from vllm.entrypoints.launchers.api_server.entry import build_async_engine_client

        self.client = await self._stack.enter_async_context(build_async_engine_client(self.args))
        self.supported_tasks = tuple(await self.client.get_supported_tasks())
        self._started.set()
        logger.info("engine ready: model=%s max_model_len=%d", self.args.model, self.max_model_len)

    async def stop(self) -> None:
        await self._stack.aclose()
        self.client = None

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

    @property
    def tokenizer(self) -> Any:
        return self.client.renderer.tokenizer

    async def render(self, texts: list[str], max_tokens: int = 0) -> list[Any]:
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
            return await renderer.render_cmpl_async(prompts, params)
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise InvalidInput(str(exc)) from exc

    async def generate(
        self, engine_input: Any, sampling_params: Any, request_id: str, *, priority: int = 0
    ) -> AsyncIterator[Any]:
        """Stream RequestOutputs; cancelling the consumer aborts the request in the engine."""
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        self.check_ready()
        try:
            async for out in self.client.generate(
                engine_input, sampling_params, request_id, priority=priority
            ):
                yield out
        except EngineDeadError as exc:
            raise NotReady("Engine is dead; the server will be restarted.") from exc
        except (VLLMClientError, ValueError, TypeError) as exc:
            raise InvalidInput(str(exc)) from exc

"""Eventing's view of the server's data plane: the little it uses, typed (tests pass a fake)."""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any, Protocol

from predictors.dataplane import Generation
from predictors.sampling import GenerateParameters


class DataPlaneView(Protocol):
    model_name: str
    online_changed: asyncio.Event  # set whenever online_load changes

    @property
    def online_load(self) -> int:
        """Online requests in flight on this replica (background work backs off from them)."""
        ...

    @property
    def ready(self) -> bool: ...

    def online(self) -> contextlib.AbstractContextManager[None]:
        """Count the block as online work."""
        ...

    def model_names(self) -> list[str]:
        """The names served here: the base model, then its LoRA adapters."""
        ...

    async def generate(
        self,
        prompt: str,
        params: GenerateParameters,
        *,
        request_id: str | None = None,
        priority: int = 0,
        model: str | None = None,
        logprobs: bool = False,
    ) -> Generation: ...

    async def openai_call(self, url: str, body: Any, *, priority: int = 0) -> tuple[int, dict[str, Any]]: ...

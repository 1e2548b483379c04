"""A fix for vLLM's CPU LoRA kernels (vLLM 0.32), loaded into the engine's worker process.

In a batch that mixes base-model and adapter requests, base-model tokens carry LoRA index -1, which the
GPU kernels skip; the CPU ones (`vllm.lora.ops.torch_ops`' bgmv_*) index the stacked adapter weights
with it, and Python's negative indexing picks the *last* adapter slot: base-model requests were generated
through an adapter whenever one ran beside them (measured: with --max-loras 1, four "Hello world"
requests, two with the demo adapter, all four gave the adapter's tokens).

The fix gives every LoRA layer one adapter slot more than the engine assigns (`--max-loras` + 1): the
last slot is never loaded, so its weights stay zero, and index -1 now reads it: base-model rows get a
zero LoRA contribution, as on GPU, with no work added to the kernels (an earlier version masked the rows
in every kernel call: ~10 % of LoRA throughput on the demo model). Fused-MoE LoRA layers keep vLLM's
slots (their weights are split by the slot count; they do not use these kernels).

The engine runs in its own process; vLLM's ``--worker-extension-cls`` is the hook that imports a class
there, so `predictors.server` sets it to `CPULoRAFix` when LoRA is on and the platform is CPU, and this
module patches vLLM's LoRA layer factories when it is imported (before the worker builds its model).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

QUALNAME = "predictors.cpu_lora.CPULoRAFix"
# vLLM's LoRA layer factories, as the model manager calls them, and where each takes `max_loras`.
FACTORIES = {"from_layer": 1, "from_layer_logits_processor": 2}


def with_spare_slot(factory: Callable[..., Any], slots_at: int) -> Callable[..., Any]:
    """``factory(..., max_loras, ...)`` (`max_loras` the positional argument `slots_at`) building the LoRA
    layer with one more (never assigned, so all-zero) adapter slot: the one index -1 reads."""

    @functools.wraps(factory)
    def build(*args: Any, **kwargs: Any) -> Any:
        from vllm.model_executor.layers.fused_moe import MoERunner

        if not isinstance(args[0], MoERunner):
            args = (*args[:slots_at], args[slots_at] + 1, *args[slots_at + 1 :])
        return factory(*args, **kwargs)

    build.evllm_fixed = True  # type: ignore[attr-defined]
    return build


def apply() -> None:
    """Patch the factories where the LoRA model manager calls them. Idempotent."""
    import vllm.lora.model_manager as manager

    for name, slots_at in FACTORIES.items():
        factory = getattr(manager, name)
        if not getattr(factory, "evllm_fixed", False):
            setattr(manager, name, with_spare_slot(factory, slots_at))


class CPULoRAFix:
    """vLLM's worker extension hook; it adds no worker methods (the import is what applies the fix)."""


apply()

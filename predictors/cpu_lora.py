"""A fix for vLLM's CPU LoRA kernels (vLLM 0.32), loaded into the engine's worker process.

In a batch that mixes base-model and adapter requests, base-model tokens carry LoRA index -1, which the
GPU kernels skip; the CPU ones (`vllm.lora.ops.torch_ops`' bgmv_*) index the stacked adapter weights
with it, and Python's negative indexing picks the *last* adapter slot: base-model requests were generated
through an adapter whenever one ran beside them (measured: with --max-loras 1, four "Hello world"
requests, two with the demo adapter, all four gave the adapter's tokens). Here the inputs of index -1
rows are zeroed before the kernel, so their LoRA contribution is exactly 0, as on GPU.

The engine runs in its own process; vLLM's ``--worker-extension-cls`` is the hook that imports a class
there, so `predictors.server` sets it to `CPULoRAFix` when LoRA is on and the platform is CPU, and this
module patches the kernels when it is imported.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

KERNELS = ("bgmv_shrink", "bgmv_expand", "bgmv_expand_slice")
QUALNAME = "predictors.cpu_lora.CPULoRAFix"


def zero_base_rows(kernel: Callable[..., Any]) -> Callable[..., Any]:
    """``kernel(inputs, weights, output, indices, ...)`` with the rows of index -1 zeroed in ``inputs``."""

    @functools.wraps(kernel)
    def fixed(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        base = indices < 0
        if bool(base.any()):
            n = min(inputs.shape[0], base.shape[0])
            inputs = inputs.clone()
            inputs[:n][base[:n]] = 0
        return kernel(inputs, weights, output, indices, *args, **kwargs)

    fixed.evllm_fixed = True  # type: ignore[attr-defined]
    return fixed


def apply() -> None:
    """Patch the kernels where vLLM looks them up: the module (its sgmv_* call bgmv_* through it), the
    package that re-exports them, and the CPU punica wrapper that imported them by name. Idempotent."""
    import vllm.lora.ops.torch_ops as package
    import vllm.lora.ops.torch_ops.lora_ops as ops
    import vllm.lora.punica_wrapper.punica_cpu as punica_cpu

    for name in KERNELS:
        kernel = getattr(ops, name)
        if getattr(kernel, "evllm_fixed", False):
            continue
        fixed = zero_base_rows(kernel)
        for module in (ops, package, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, fixed)


class CPULoRAFix:
    """vLLM's worker extension hook; it adds no worker methods (the import is what applies the fix)."""


apply()

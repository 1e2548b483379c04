"""A fix for vLLM's CPU LoRA kernels (vLLM 0.32), loaded into the engine's worker process.

In a batch that mixes base-model and adapter requests, base-model tokens carry LoRA index -1, which the
GPU kernels skip; the CPU ones (`vllm.lora.ops.torch_ops`' bgmv_*) index the stacked adapter weights
with it, and Python's negative indexing picks the *last* adapter slot: base-model requests were generated
through an adapter whenever one ran beside them (measured: with --max-loras 1, four "Hello world"
requests, two with the demo adapter, all four gave the adapter's tokens). Here index -1
rows get no LoRA contribution (shrink's output rows zeroed, expand's input rows zeroed), as on GPU.

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


class BaseRows:
    """The rows of index -1 of the punica wrapper's index buffers, computed once when vLLM sets a new LoRA
    mapping (`update_metadata`) instead of in each of a step's many kernel calls; indices the wrapper did
    not announce (prefill's per-call expansions) are computed on the spot."""

    def __init__(self) -> None:
        self._masks: dict[tuple[int, int], Any] = {}

    def refresh(self, *buffers: Any) -> None:
        self._masks = {(b.data_ptr(), b.numel()): self._mask(b) for b in buffers}

    @staticmethod
    def _mask(indices: Any) -> Any:
        mask = indices < 0
        return mask if bool(mask.any()) else None

    def __call__(self, indices: Any) -> Any:
        """The boolean mask of base rows, or None when the batch has none."""
        where = (indices.data_ptr(), indices.numel())
        if where in self._masks:
            return self._masks[where]
        return self._mask(indices)


BASE_ROWS = BaseRows()


def zero_base_rows(kernel: Callable[..., Any], *, shrink: bool = False) -> Callable[..., Any]:
    """``kernel(inputs, weights, output, indices, ...)`` giving rows of index -1 no LoRA contribution.
    Shrink overwrites its output rows, so those are zeroed after it (no copy of the hidden states);
    expand adds to its output, so its (rank-sized) input rows are zeroed in a copy first."""

    @functools.wraps(kernel)
    def fixed(inputs: Any, weights: Any, output: Any, indices: Any, *args: Any, **kwargs: Any) -> Any:
        base = BASE_ROWS(indices)
        if base is None:
            return kernel(inputs, weights, output, indices, *args, **kwargs)
        if shrink:
            result = kernel(inputs, weights, output, indices, *args, **kwargs)
            n = min(output.shape[0], base.shape[0])
            output[:n][base[:n]] = 0
            return result
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

    wrapper = punica_cpu.PunicaWrapperCPU
    if not getattr(wrapper.update_metadata, "evllm_fixed", False):
        update = wrapper.update_metadata

        @functools.wraps(update)
        def update_metadata(self: Any, *args: Any, **kwargs: Any) -> Any:
            result = update(self, *args, **kwargs)
            BASE_ROWS.refresh(self.token_lora_indices, self.sampler_indices)
            return result

        update_metadata.evllm_fixed = True  # type: ignore[attr-defined]
        wrapper.update_metadata = update_metadata
    for name in KERNELS:
        kernel = getattr(ops, name)
        if getattr(kernel, "evllm_fixed", False):
            continue
        fixed = zero_base_rows(kernel, shrink=name == "bgmv_shrink")
        for module in (ops, package, punica_cpu):
            if hasattr(module, name):
                setattr(module, name, fixed)


class CPULoRAFix:
    """vLLM's worker extension hook; it adds no worker methods (the import is what applies the fix)."""


apply()

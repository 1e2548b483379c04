"""A KV cache size for the CPU engine when the user gives none.

vLLM's CPU worker otherwise reserves ``--gpu-memory-utilization`` (default 0.92) of the NUMA node's
*total* memory and refuses to start when less than that is *available* — which, on a machine whose page
cache holds a few GiB, is always. The size chosen here is the most the engine can ever use (every
sequence of the batch at full context), capped at a quarter of the memory available at startup so the
weights, activations and the rest of the machine keep room. A user's own ``VLLM_CPU_KVCACHE_SPACE``,
``--kv-cache-memory-bytes`` or ``--gpu-memory-utilization`` always wins.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any

from .errors import EngineStartFailed

logger = logging.getLogger("evllm.engine")

GiB = 1024**3
MiB = 1024**2
AVAILABLE_FRACTION = 4  # at most 1/4 of the memory available at startup
USER_FLAGS = ("--kv-cache-memory-bytes", "--gpu-memory-utilization")
USER_ENV = "VLLM_CPU_KVCACHE_SPACE"


@dataclass(frozen=True)
class Geometry:
    """What one token of context costs in the KV cache, and how many tokens the engine can hold."""

    layers: int
    kv_heads: int
    head_size: int
    dtype_bytes: int
    max_model_len: int
    max_num_seqs: int

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_size * self.dtype_bytes  # K and V

    @property
    def one_sequence(self) -> int:
        return self.bytes_per_token * self.max_model_len


def choose(geometry: Geometry, available: int) -> tuple[int, str]:
    """(bytes, why): enough for every sequence at full context, capped at available/4, whole MiB."""
    full = geometry.one_sequence * geometry.max_num_seqs
    cap = available // AVAILABLE_FRACTION
    size = min(full, cap)
    size = max(MiB, -(-size // MiB) * MiB)
    if size < geometry.one_sequence:
        raise EngineStartFailed(
            f"the KV cache for one {geometry.max_model_len}-token sequence needs "
            f"{geometry.one_sequence / GiB:.2f} GiB but only {available / GiB:.2f} GiB of memory is "
            "available: lower --max-model-len, or set --kv-cache-memory-bytes"
        )
    if full <= cap:
        why = (
            f"{geometry.max_num_seqs} sequences x {geometry.max_model_len} tokens x "
            f"{geometry.bytes_per_token} bytes/token: all the engine can use"
        )
    else:
        why = f"a quarter of the {available / GiB:.2f} GiB available at startup"
    return size, why


def user_chose(explicit_flags: set[str], environ: dict[str, str] | None = None) -> bool:
    env = os.environ if environ is None else environ
    return bool(env.get(USER_ENV)) or any(f in explicit_flags for f in USER_FLAGS)


def geometry_of(vllm_config: Any) -> Geometry:
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    return Geometry(
        layers=model.get_num_layers(parallel),
        kv_heads=model.get_num_kv_heads(parallel),
        head_size=model.get_head_size(),
        dtype_bytes=model.dtype.itemsize,
        max_model_len=model.max_model_len,
        max_num_seqs=vllm_config.scheduler_config.max_num_seqs,
    )


def check_user_size(requested: int, available: int) -> None:
    """A KV cache the user asked for that cannot fit: one clear line now, not a worker traceback later."""
    if requested > available:
        raise EngineStartFailed(
            f"the KV cache asked for ({requested / GiB:.2f} GiB) is more than the {available / GiB:.2f} GiB "
            "of memory available: lower --kv-cache-memory-bytes (or VLLM_CPU_KVCACHE_SPACE, in GiB)"
        )


def apply_cpu_default(vllm_config: Any, explicit_flags: set[str]) -> None:
    """On the CPU platform with no size from the user, set ``kv_cache_memory_bytes`` and log why."""
    import psutil
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        return
    available = psutil.virtual_memory().available
    requested = vllm_config.cache_config.kv_cache_memory_bytes
    if requested is not None:
        check_user_size(requested, available)
        return
    if user_chose(explicit_flags):
        return
    size, why = choose(geometry_of(vllm_config), available)
    vllm_config.cache_config.kv_cache_memory_bytes = size
    logger.info(
        "KV cache on CPU: %.2f GiB (%s); choose it with --kv-cache-memory-bytes or %s",
        size / GiB,
        why,
        USER_ENV,
    )

"""The CPU KV cache size evllm chooses when the user gives none (predictors/kv_cache.py)."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import psutil
import pytest

from predictors import demo_model, kv_cache
from predictors.errors import EngineStartFailed
from predictors.kv_cache import Geometry, GiB, MiB, check_user_size, choose, user_chose

# The demo model (2 layers, 2 KV heads of 64, fp32) at its full context, vLLM's default batch of 256.
DEMO = Geometry(
    layers=demo_model.LAYERS,
    kv_heads=demo_model.KV_HEADS,
    head_size=demo_model.HIDDEN // demo_model.HEADS,
    dtype_bytes=4,
    max_model_len=demo_model.MAX_POSITIONS,
    max_num_seqs=256,
)
# A 7B Llama: 32 layers, 32 KV heads of 128, bf16, 4096 tokens of context.
LLAMA_7B = Geometry(
    layers=32, kv_heads=32, head_size=128, dtype_bytes=2, max_model_len=4096, max_num_seqs=256
)


def test_geometry():
    assert DEMO.bytes_per_token == 2 * 2 * 2 * 64 * 4 == 2048
    assert DEMO.one_sequence == 4 * MiB
    assert LLAMA_7B.bytes_per_token == 512 * 1024 and LLAMA_7B.one_sequence == 2 * GiB


def test_the_demo_model_gets_all_it_can_use():
    size, why = choose(DEMO, available=16 * GiB)
    assert size == 256 * 4 * MiB == 1 * GiB
    assert why == "256 sequences x 2048 tokens x 2048 bytes/token: all the engine can use"


def test_a_big_model_is_capped_at_a_quarter_of_available_memory():
    size, why = choose(LLAMA_7B, available=64 * GiB)
    assert size == 16 * GiB  # not the 512 GiB that 256 full sequences would need
    assert why == "a quarter of the 64.00 GiB available at startup"
    # Whole MiB, rounded up.
    size, _ = choose(LLAMA_7B, available=64 * GiB + 4)
    assert size == 16 * GiB + MiB and size % MiB == 0


def test_sizes_are_whole_mib_and_at_least_one():
    tiny = Geometry(layers=1, kv_heads=1, head_size=1, dtype_bytes=1, max_model_len=10, max_num_seqs=1)
    size, _ = choose(tiny, available=GiB)
    assert size == MiB


def test_too_little_memory_for_one_sequence_is_a_clear_start_failure():
    with pytest.raises(EngineStartFailed) as exc:
        choose(LLAMA_7B, available=6 * GiB)  # a quarter is 1.5 GiB; one sequence needs 2
    message = str(exc.value)
    assert message == (
        "the KV cache for one 4096-token sequence needs 2.00 GiB but only 6.00 GiB of memory is "
        "available: lower --max-model-len, or set --kv-cache-memory-bytes"
    )
    # Exactly one sequence fits: the engine starts (serving one request at a time).
    size, _ = choose(LLAMA_7B, available=8 * GiB)
    assert size == 2 * GiB


def test_the_users_choice_wins():
    assert not user_chose(set(), {})
    assert not user_chose({"--max-model-len", "--dtype"}, {})
    assert user_chose({"--kv-cache-memory-bytes"}, {})
    assert user_chose({"--gpu-memory-utilization"}, {})
    assert user_chose(set(), {"VLLM_CPU_KVCACHE_SPACE": "4"})
    assert not user_chose(set(), {"VLLM_CPU_KVCACHE_SPACE": ""})


def test_a_user_size_that_cannot_fit_is_refused():
    check_user_size(4 * GiB, available=4 * GiB)
    with pytest.raises(EngineStartFailed) as exc:
        check_user_size(8 * GiB, available=4 * GiB)
    assert str(exc.value) == (
        "the KV cache asked for (8.00 GiB) is more than the 4.00 GiB of memory available: lower "
        "--kv-cache-memory-bytes (or VLLM_CPU_KVCACHE_SPACE, in GiB)"
    )


# apply_cpu_default on a VllmConfig-shaped object -------------------------------------------------------
def _config(geometry: Geometry, requested: int | None = None) -> Any:
    model = SimpleNamespace(
        get_num_layers=lambda parallel: geometry.layers,
        get_num_kv_heads=lambda parallel: geometry.kv_heads,
        get_head_size=lambda: geometry.head_size,
        dtype=SimpleNamespace(itemsize=geometry.dtype_bytes),
        max_model_len=geometry.max_model_len,
    )
    return SimpleNamespace(
        model_config=model,
        parallel_config=SimpleNamespace(),
        scheduler_config=SimpleNamespace(max_num_seqs=geometry.max_num_seqs),
        cache_config=SimpleNamespace(kv_cache_memory_bytes=requested),
    )


@pytest.fixture
def machine(monkeypatch: pytest.MonkeyPatch) -> SimpleNamespace:
    """A CPU platform with 64 GiB available and no VLLM_CPU_KVCACHE_SPACE."""
    state = SimpleNamespace(cpu=True, available=64 * GiB)
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.setattr(psutil, "virtual_memory", lambda: SimpleNamespace(available=state.available))
    monkeypatch.setattr("vllm.platforms.current_platform", SimpleNamespace(is_cpu=lambda: state.cpu))
    return state


def test_geometry_is_read_from_the_vllm_config():
    assert kv_cache.geometry_of(_config(LLAMA_7B)) == LLAMA_7B


def test_apply_cpu_default_sets_the_size_and_says_why(
    machine: SimpleNamespace, caplog: pytest.LogCaptureFixture
):
    config = _config(DEMO)
    with caplog.at_level("INFO", logger="evllm.engine"):
        kv_cache.apply_cpu_default(config, set())
    assert config.cache_config.kv_cache_memory_bytes == 1 * GiB
    assert "KV cache on CPU: 1.00 GiB (256 sequences x 2048 tokens" in caplog.text
    assert "--kv-cache-memory-bytes or VLLM_CPU_KVCACHE_SPACE" in caplog.text


def test_apply_cpu_default_leaves_the_users_choice_alone(
    machine: SimpleNamespace, monkeypatch: pytest.MonkeyPatch
):
    config = _config(DEMO)
    kv_cache.apply_cpu_default(config, {"--gpu-memory-utilization"})
    assert config.cache_config.kv_cache_memory_bytes is None
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    kv_cache.apply_cpu_default(config, set())
    assert config.cache_config.kv_cache_memory_bytes is None
    # An explicit size is kept, and checked against what is available.
    config = _config(DEMO, requested=3 * GiB)
    kv_cache.apply_cpu_default(config, {"--kv-cache-memory-bytes"})
    assert config.cache_config.kv_cache_memory_bytes == 3 * GiB
    machine.available = 2 * GiB
    with pytest.raises(EngineStartFailed, match="lower --kv-cache-memory-bytes"):
        kv_cache.apply_cpu_default(config, {"--kv-cache-memory-bytes"})


def test_apply_cpu_default_refuses_a_context_that_cannot_fit(machine: SimpleNamespace):
    machine.available = 6 * GiB
    with pytest.raises(EngineStartFailed, match="lower --max-model-len, or set --kv-cache-memory-bytes"):
        kv_cache.apply_cpu_default(_config(LLAMA_7B), set())


def test_apply_cpu_default_does_nothing_off_cpu(machine: SimpleNamespace):
    machine.cpu = False
    config = _config(LLAMA_7B)
    kv_cache.apply_cpu_default(config, set())
    assert config.cache_config.kv_cache_memory_bytes is None

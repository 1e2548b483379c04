"""vLLM's compile cache: where it lives, and the fix that lets it reload on vLLM 0.32's CPU path.

A start compiles the model (torch.compile: Dynamo tracing, then Inductor) unless vLLM's cache under
``VLLM_CACHE_ROOT`` already holds the result. evllm keeps that cache in ``<--cache_dir>/vllm`` (unless
``VLLM_CACHE_ROOT`` is set), beside the demo model, so `evllm prepare` can fill one directory that every
replica's `evllm serve` reuses.

Why the AOT artifact did not reload ("Compiling model again due to a load failure ... 'function' object
has no attribute 'finalize_loading'"): on CPU, vLLM runs torch.compile in DYNAMO_TRACE_ONCE mode with
torch's own "inductor" backend (vllm/platforms/cpu.py), not vLLM's VllmBackend. AOT compile is on by
default with torch >= 2.10 (vllm/envs.py `use_aot_compile`), so the compiled function is saved through
torch's ``BundledAOTAutogradSerializableCallable`` (torch/_dynamo/aot_compile.py). On reload,
vllm/compilation/decorators.py `_try_load_aot_compiled_fn` calls ``compiled_fn.finalize_loading(...)``
unconditionally, a method only vLLM's ``VllmSerializableFunction`` (VllmBackend, the GPU path) has; the
torch wrapper forwards the lookup to the plain function inside it, which raises, and vLLM recompiles
(Dynamo and Inductor again, Inductor's cache hits) every start. No vLLM setting avoids it:
``VLLM_USE_AOT_COMPILE=0`` only skips the (wasted) save and load. The torch wrapper is complete once
deserialized (``deserialize_bundled_cache_entry`` loads the compiled artifact), so its finalize step is a
no-op: `register` adds exactly that. It runs in vLLM's engine and worker processes as a vLLM general
plugin (entry point ``vllm.general_plugins`` in pyproject.toml), the way vLLM loads code into them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

logger = logging.getLogger("evllm.compile_cache")

VLLM_CACHE_ENV = "VLLM_CACHE_ROOT"
HF_ENV = "HF_HOME"  # where vLLM downloads a Hugging Face id's weights


def register() -> None:
    """vLLM general plugin: give torch's AOTAutograd wrapper the no-op finalize step vLLM calls."""
    try:
        from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled
    except ImportError:  # torch without AOT compile: nothing to fix
        return
    if "finalize_loading" in vars(Bundled):  # fixed upstream, or registered already
        return

    def finalize_loading(self: Any, vllm_config: Any) -> None:
        """Already loaded by deserialize_compile_artifacts."""

    Bundled.finalize_loading = finalize_loading


def vllm_cache_dir(cache_dir: str) -> Path:
    return Path(cache_dir).expanduser() / "vllm"


def use(cache_dir: str, environ: dict[str, str] | None = None) -> Path:
    """Point vLLM's cache at ``<cache_dir>/vllm`` unless VLLM_CACHE_ROOT is set, and Hugging Face
    downloads at ``<cache_dir>/huggingface`` unless HF_HOME is set; returns vLLM's cache directory.

    A prepared cache on a read-only volume (a pvc:// model mount) is copied to a writable temporary
    directory first: vLLM and Inductor write beside what they read (locks, a changed shape's kernels).
    """
    env = os.environ if environ is None else environ
    if not env.get(HF_ENV):
        env[HF_ENV] = str(Path(cache_dir).expanduser() / "huggingface")
    if env.get(VLLM_CACHE_ENV):
        return Path(env[VLLM_CACHE_ENV])
    path = vllm_cache_dir(cache_dir)
    if path.is_dir() and not os.access(path, os.W_OK):
        copy = Path(tempfile.gettempdir()) / "evllm-vllm-cache"
        shutil.copytree(path, copy, dirs_exist_ok=True)
        logger.info("compile cache %s is read-only: using a copy in %s", path, copy)
        path = copy
    env[VLLM_CACHE_ENV] = str(path)
    return path

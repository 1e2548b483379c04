"""`evllm prepare`: build everything a start can reuse into --cache_dir, then exit.

Same flags as `evllm serve` (the compile cache is keyed on the model, the engine flags and the hardware,
so prepare with the flags and the GPU type that serve will use). It generates the demo model or checks
the model directory, starts the engine once (vLLM compiles the model and saves the result under
``<cache_dir>/vllm``; a Hugging Face id is downloaded into ``<cache_dir>/huggingface``), stops it and
prints where everything is. `evllm serve --cache_dir` (EVLLM_CACHE_DIR) on the same directory starts warm.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sys
from collections.abc import Sequence

from . import compile_cache
from .engine import Engine, explain_start_failure
from .extension import Extension
from .startup import Timeline


async def _build(engine: Engine) -> None:
    await engine.start()
    client, engine.client = engine.client, None
    client.shutdown()
    # Collected now, not at interpreter exit, when AsyncLLM.__del__ would find its modules torn down.
    del client
    gc.collect()


def prepare(argv: Sequence[str], extensions: Sequence[Extension] = ()) -> None:
    import time

    from . import logs
    from .server import parse_args, use_caches

    imported = time.time()
    settings = parse_args(argv, extensions, use_caches)
    logs.configure(settings.server.log_format)
    cache = compile_cache.use(settings.server.cache_dir)  # already set: where it is
    timeline = Timeline(settings.kserve.model_name)
    timeline.end("imports", imported)
    engine = Engine(settings.engine, settings.engine_flags, timeline)
    try:
        asyncio.run(_build(engine))
    except Exception as exc:
        print(f"evllm prepare: engine failed to start: {explain_start_failure(exc)}", file=sys.stderr)
        sys.exit(1)
    phases = ", ".join(f"{p} {s:.1f} s" for p, s in timeline.seconds.items())
    print(
        f"evllm prepare: model {settings.engine.model}; compile cache {cache}; Hugging Face cache "
        f"{os.environ.get('HF_HOME', '')}; this start: {phases}"
    )

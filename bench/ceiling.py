"""`python -m bench.ceiling`: how much of V2 generate's throughput the HTTP hop costs, on this machine.

Three series at one concurrency, closed loop, 32 tokens, windows alternated with `vllm serve`'s (A B A C A B
A C ...), each ratio against the `vllm serve` windows beside it (as in `make bench`):
- `vllm serve`'s OpenAI completions over HTTP: the baseline;
- `evllm serve`'s V2 generate over HTTP: what `make bench` measures;
- evllm's data plane driven from this process on an engine of its own, built as `evllm serve` builds it:
  the same `DataPlane.generate` call the V2 generate route makes, with no HTTP server, no HTTP client and
  no hop between processes. No HTTP front end can beat it: it is the ceiling.

Three engines are up at once, two of them idle at any time (~1% of a core each). Results: printed, and
written as JSON to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from predictors.dataplane import DataPlane
from predictors.demo_model import ensure_demo_model
from predictors.sampling import parse_parameters

from .load import OUTPUT_TOKENS, PROMPTS, LoadResult, openai_completions, run_load, v2_generate
from .report import med, ratios
from .run import Config
from .servers import MODEL_NAME, Server, engine_lock, work_dir

SERIES = {"v2-generate": "evllm V2 generate over HTTP", "in-process": "evllm data plane, in-process"}


async def in_process_loop(
    dataplane: DataPlane,
    concurrency: int,
    warmup: float,
    duration: float,
    prompts: Sequence[str] = PROMPTS,
    max_tokens: int = OUTPUT_TOKENS,
) -> LoadResult:
    """`load.closed_loop` without HTTP: each worker calls the data plane as the V2 generate route does
    (the same parameters as the benchmark's generate body), and counts what finishes inside the window."""
    params = parse_parameters({"max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True})
    latencies: list[float] = []
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration

    async def worker(k: int) -> None:
        i = k
        while (t0 := time.perf_counter()) < t_end:
            g = await dataplane.generate(prompts[i % len(prompts)], params, model=dataplane.model_name)
            i += 1
            t1 = time.perf_counter()
            if g.completion_tokens != max_tokens:
                raise RuntimeError(
                    f"in-process: {g.completion_tokens} completion tokens, expected {max_tokens}"
                )
            if t_measure <= t1 <= t_end:
                latencies.append(t1 - t0)

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return LoadResult.of("in-process", concurrency, duration, latencies, len(latencies) * max_tokens, 0)


def summarize(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per evllm series: its windows' throughput over `vllm serve`'s beside them, and their median."""
    base = [r for r in rows if r["server"] == "vllm"]
    out = {}
    for series in SERIES:
        mine = [r for r in rows if r["protocol"] == series]
        if mine:
            per = ratios(mine, base, "tok_s")
            out[series] = {"req_s": med([r["req_s"] for r in mine]), "ratio": med(per), "ratios": per}
    return out


async def _measure(
    args: argparse.Namespace, cfg: Config, model: Path, vllm: Server, evllm: Server
) -> list[dict[str, Any]]:
    from predictors.engine import Engine
    from predictors.model import EvllmModel
    from predictors.server import parse_args

    settings = parse_args(["--model_name", MODEL_NAME, "--model_dir", str(model), *cfg.engine_args])
    dataplane = DataPlane(Engine(settings.engine, settings.engine_flags), MODEL_NAME)
    await EvllmModel(MODEL_NAME, dataplane).start_engine()  # as evllm serve starts it (GC heap frozen)
    rows: list[dict[str, Any]] = []
    c, warmup, duration = args.concurrency, cfg.warmup, args.duration
    base = openai_completions(vllm.openai_prefix, MODEL_NAME)

    def record(server: str, res: LoadResult) -> None:
        rows.append({"repeat": 0, "window": len(rows) + 1, "server": server, **res.to_dict()})

    async def http(server: Server, proto: Any) -> None:
        # In its own thread and event loop, as `make bench`'s client runs (this loop only waits).
        record(server.kind, await asyncio.to_thread(run_load, server.url, proto, c, warmup, duration))

    try:
        await in_process_loop(dataplane, c, 0.0, 3.0)  # the engine's first requests are slow
        await http(vllm, base)
        for _ in range(args.pairs):
            await http(evllm, v2_generate(MODEL_NAME))
            await http(vllm, base)
            res = await in_process_loop(dataplane, c, warmup, duration)
            print(f"  {'in-process':12s} c={c:<3d} {res.req_s:7.1f} req/s {res.tok_s:8.0f} tok/s", flush=True)
            record("evllm", res)
            await http(vllm, base)
    finally:
        dataplane.engine.client.shutdown()
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ceiling", description=__doc__)
    p.add_argument("--pairs", type=int, default=4, help="windows of each evllm series (default 4)")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=12.0, help="measured seconds per window")
    p.add_argument("--out", type=Path, help="write the windows and ratios here (JSON)")
    args = p.parse_args(argv)
    cfg = Config()
    work = work_dir()
    model = ensure_demo_model(work / "demo")
    vllm_args = [*cfg.engine_args, "--scheduling-policy", cfg.vllm_policy]
    os.environ.update(cfg.env)  # the in-process engine gets the servers' environment
    with engine_lock():
        vllm = Server("vllm", model, vllm_args, cfg.env, work)
        evllm = Server("evllm", model, list(cfg.engine_args), cfg.env, work)
        try:
            vllm.start()
            evllm.start()
            import uvloop

            rows = uvloop.run(_measure(args, cfg, model, vllm, evllm))
        finally:
            evllm.stop()
            vllm.stop()
    summary = summarize(rows)
    for series, s in summary.items():
        each = " ".join(f"{x:.2f}" for x in s["ratios"])
        print(f"{SERIES[series]}: {s['req_s']:.1f} req/s, {s['ratio']:.2f}x vllm serve (windows {each})")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        config = {"concurrency": args.concurrency, "duration": args.duration, "warmup": cfg.warmup,
                  "pairs": args.pairs, "engine_args": cfg.engine_args, "env": cfg.env}  # fmt: skip
        out = {"config": config, "windows": rows, "summary": summary}
        args.out.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

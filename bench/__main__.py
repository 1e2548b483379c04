"""`python -m bench` (make bench): the full run, results in bench/results/. `--smoke`: a short run of
every part of the harness (tiny counts, real servers), results in a temporary directory. `--url`: measure
an evllm serve that is already running (no engine started, no vllm serve comparison)."""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from .report import write
from .run import Bench, Config

RESULTS = Path(__file__).resolve().parent / "results"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    p.add_argument("--smoke", action="store_true", help="tiny counts: checks the harness, not performance")
    p.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    p.add_argument("--repeats", type=int)
    p.add_argument("--concurrency", type=int, nargs="+", help="online concurrencies (default 1 16 64)")
    p.add_argument("--duration", type=float, help="measured seconds per online point")
    p.add_argument("--warmup", type=float, help="unmeasured seconds before each online point")
    p.add_argument("--batch-lines", type=int, nargs=2, metavar=("SMALL", "BIG"))
    p.add_argument("--chunk-size", type=int, help="evllm batch job chunk_size (0: the server's default)")
    p.add_argument("--priority-lines", type=int, help="lines of the batch job run under online load")
    p.add_argument("--lora-concurrency", type=int, help="concurrency of the LoRA runs (default 16)")
    p.add_argument(
        "--sections",
        nargs="+",
        choices=["online", "batch", "run_batch", "priority", "startup", "lora"],
        help="default: all; batch = evllm jobs, run_batch = vllm run-batch, startup = cold starts by phase "
        "(fresh and prepared cache, both servers), lora = both servers with the demo LoRA adapter, traffic "
        "over base and adapter",
    )
    p.add_argument(
        "--report-only", action="store_true", help="rewrite results.md/bench.png from results.json"
    )
    p.add_argument(
        "--url",
        help="attach to the evllm serve running at URL instead of starting servers: its online, batch and "
        "priority sections only (no vllm serve / run-batch comparison, no cold start)",
    )
    p.add_argument(
        "--grpc", help="with --url: that server's gRPC host:port (measures V2 infer over gRPC too)"
    )
    p.add_argument(
        "--storage",
        type=Path,
        help="with --url: a directory inside that server's --storage_roots for the batch and priority jobs",
    )
    args = p.parse_args(argv)
    if args.storage is not None and args.url is None:
        p.error("--storage goes with --url (started servers get their own storage)")

    cfg = Config.smoke() if args.smoke else Config()
    for name, value in (("repeats", args.repeats), ("concurrencies", args.concurrency),
                        ("duration", args.duration), ("warmup", args.warmup),
                        ("priority_lines", args.priority_lines),
                        ("lora_concurrency", args.lora_concurrency)):  # fmt: skip
        if value is not None:
            setattr(cfg, name, value)
    if args.batch_lines:
        cfg.batch_small, cfg.batch_big = args.batch_lines
    if args.chunk_size is not None:
        cfg.chunk_size = args.chunk_size or None
    if args.sections:
        cfg.sections = tuple(args.sections)
    if args.url is not None:
        own = [s for s in ("run_batch", "startup", "lora") if s in (args.sections or ())]
        if own:
            p.error(f"--url: {' and '.join(own)} starts its own engines; leave it out")
        cfg.sections = tuple(s for s in cfg.sections if s not in ("run_batch", "startup", "lora"))
        if {"batch", "priority"} & set(cfg.sections) and args.storage is None:
            p.error(
                "--url with the batch or priority section needs --storage (inside the server's storage roots)"
            )
        cfg.url = args.url.rstrip("/")
        cfg.grpc = args.grpc
        cfg.storage = str(args.storage.resolve()) if args.storage is not None else None
    # bench/results/ holds the published A/B figures: only a full run with its own servers writes there.
    scratch = args.smoke or args.url is not None
    out = args.out or (Path(tempfile.mkdtemp(prefix="evllm-bench-smoke-")) if scratch else RESULTS)
    out.mkdir(parents=True, exist_ok=True)

    results = json.loads((out / "results.json").read_text()) if args.report_only else Bench(cfg, out).run()
    summary = write(results, out)
    print((out / "results.md").read_text())
    print(f"results: {out}/results.md, {out}/bench.png, {out}/results.json")
    missing = [t["target"] for t in summary["targets"] if t["met"] is None]
    if missing and not args.smoke:
        print(f"not measured: {', '.join(missing)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

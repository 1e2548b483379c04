"""Profile evllm's API server process under load: `python -m bench.profile [--protocol v2-infer]`.

Starts `evllm serve` (engine lock held), drives closed-loop load, and records the API server process
(not the engine core) with py-spy for the measured window; writes a speedscope/flamegraph file and prints
the top functions by own time.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from predictors.demo_model import ensure_demo_model

from . import batchjobs
from .load import openai_completions, run_load, v2_generate, v2_infer
from .run import Config
from .servers import MODEL_NAME, Server, running, work_dir


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.profile", description=__doc__)
    p.add_argument("--server", choices=["evllm", "vllm"], default="evllm")
    p.add_argument("--protocol", choices=["openai", "v2-infer", "v2-generate"], default="v2-infer")
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--duration", type=float, default=15.0)
    p.add_argument("--out", type=Path, default=Path("bench/results/profiles"))
    p.add_argument("--rate", type=int, default=100, help="py-spy samples per second")
    p.add_argument("--batch", type=int, default=0, metavar="LINES",
                   help="profile a batch job of LINES chat lines instead of online load (evllm only)")  # fmt: skip
    args = p.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    cfg = Config()
    work = work_dir()
    model = ensure_demo_model(work / "demo")
    args.out.mkdir(parents=True, exist_ok=True)
    engine_args = list(cfg.engine_args)
    if args.server == "vllm":
        engine_args += ["--scheduling-policy", cfg.vllm_policy]
    srv = Server(args.server, model, engine_args, cfg.env, args.out, work)
    prefix = srv.openai_prefix
    proto = {"openai": lambda: openai_completions(prefix, MODEL_NAME), "v2-infer": lambda: v2_infer(MODEL_NAME),
             "v2-generate": lambda: v2_generate(MODEL_NAME)}[args.protocol]()  # fmt: skip
    stem = args.out / f"{args.server}-{args.protocol}-c{args.concurrency}"
    if args.batch:
        stem = args.out / f"{args.server}-batch-{args.batch}"
    with running(srv):
        assert srv.proc is not None
        run_load(srv.url, proto, args.concurrency, 1.0, 3.0)  # warm up
        record = [py_spy, "record", "-p", str(srv.proc.pid), "-d", str(int(args.duration)), "-r",
                  str(args.rate), "-f", "raw", "-o", f"{stem}.txt", "--nonblocking"]  # fmt: skip
        spy = threading.Thread(target=subprocess.run, args=(record,), kwargs={"capture_output": True})
        if args.batch:
            inp = batchjobs.write_batch_file(work / "profile.jsonl", args.batch)
            job = f"profile-{int(time.time())}"
            batchjobs.submit(srv.url, inp, work / "jobs", job, cfg.chunk_size)
            time.sleep(2.0)  # past the ramp-up
            spy.start()
            batchjobs.wait_done(work / "jobs", job)
        else:
            spy.start()
            run_load(srv.url, proto, args.concurrency, 0.5, args.duration)
        spy.join()
    top(Path(f"{stem}.txt"))
    return 0


def top(raw: Path, n: int = 25) -> None:
    """Own-time and inclusive-time tops from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        c = int(count)
        total += c
        frames = stack.split(";")
        own[frames[-1]] = own.get(frames[-1], 0) + c
        for f in set(frames):
            incl[f] = incl.get(f, 0) + c
    print(f"{raw}: {total} samples")
    for title, d in (("own", own), ("inclusive", incl)):
        print(f"-- top {title}")
        for f, c in sorted(d.items(), key=lambda kv: -kv[1])[:n]:
            print(f"{100 * c / total:5.1f}%  {f}")


if __name__ == "__main__":
    sys.exit(main())

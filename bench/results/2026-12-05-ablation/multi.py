"""Alternate c=16 V2 generate windows (12 s, closed loop, 32 tokens) across several servers on the demo
model, all up at once, and print each window's req/s and API-server CPU per request (/proc/<pid>/stat).

    .venv/bin/python bench/results/2026-12-05-ablation/multi.py evllm,abl+m,bare 5

Servers: `evllm` (`evllm serve` as the benchmark starts it, gRPC on), `evllm@<dir>` (the same, run from
another checkout, e.g. a `git worktree` of an earlier commit), `abl+<tag>` (`ablate.py`: evllm
serve with parts switched off by the environment given in XENV, a JSON object {name: {VAR: value}}),
`raw-asgi` (`bare_asgi.py`), `bare` (`bare.py`) and `vllm` (`vllm serve`, OpenAI completions).
"""

import json
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[2]
sys.path.insert(0, str(ROOT))

from bench.load import openai_completions, run_load, v2_generate  # noqa: E402
from bench.run import Config  # noqa: E402
from bench.servers import MODEL_NAME, engine_lock, work_dir  # noqa: E402
from bench.servers import _ready as ready  # noqa: E402
from predictors.demo_model import ensure_demo_model  # noqa: E402
from tests.server import free_port  # noqa: E402

cfg = Config()
model = ensure_demo_model(work_dir() / "demo")
py = sys.executable
EA = list(cfg.engine_args)
SERVE = ["--model_name", MODEL_NAME, "--model_dir", str(model)]


def command(kind: str, port: int) -> tuple[list[str], str | None]:
    """The server's command line and readiness path (None: the script prints READY)."""
    if kind == "evllm" or kind.startswith("evllm@"):
        grpc = ["--enable_grpc", "true", "--grpc_port", str(free_port())]
        return [py, "-m", "evllm", "serve", *SERVE, "--http_port", str(port), *grpc, *EA], "/v2/health/ready"
    if kind == "abl":
        return [py, str(HERE / "ablate.py"), *SERVE, "--http_port", str(port), *EA], "/v2/health/ready"
    if kind in ("raw-asgi", "bare"):
        script = "bare_asgi.py" if kind == "raw-asgi" else "bare.py"
        return [py, str(HERE / script), str(model), str(port)], None
    if kind == "vllm":
        api = [py, "-m", "vllm.entrypoints.openai.api_server", "--model", str(model)]
        name = ["--served-model-name", MODEL_NAME, "--host", "127.0.0.1", "--port", str(port)]
        return [*api, *name, *EA, "--scheduling-policy", cfg.vllm_policy], "/health"
    raise ValueError(kind)


def cpu(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    names = sys.argv[1].split(",")
    rounds = int(sys.argv[2]) if len(sys.argv) > 2 else 3
    extra_env = json.loads(os.environ.get("XENV", "{}"))
    procs: dict[str, tuple[subprocess.Popen[bytes], int]] = {}
    res: dict[str, list[tuple[float, float]]] = {n: [] for n in names}
    with engine_lock():
        try:
            for n in names:
                port = free_port()
                cmd, ready_path = command(n.split("+")[0], port)
                # The scripts here import the repository's bench and tests packages (not installed);
                # `python -m evllm` imports from its working directory first.
                root = n.split("@", 1)[1] if n.startswith("evllm@") else str(ROOT)
                env = {**os.environ, **cfg.env, "PYTHONPATH": root, **extra_env.get(n, {})}
                log = open(f"/tmp/multi-{n.replace('/', '_')}.log", "wb")  # noqa: SIM115 (the server's, until it exits)
                out = subprocess.PIPE if ready_path is None else log
                p = subprocess.Popen(cmd, env=env, stdout=out, stderr=log, cwd=root)
                if ready_path is None:
                    assert p.stdout is not None
                    while (line := p.stdout.readline()) and line.strip() != b"READY":
                        pass
                    assert line, f"{n} exited"
                else:
                    t = time.time()
                    while not ready(f"http://127.0.0.1:{port}{ready_path}"):
                        assert p.poll() is None and time.time() - t < 300, n
                        time.sleep(0.5)
                procs[n] = (p, port)
                print("up", n, flush=True)

            def proto(n: str):
                return openai_completions("", MODEL_NAME) if n == "vllm" else v2_generate(MODEL_NAME)

            for n in names:  # each engine's first requests are slow
                run_load(f"http://127.0.0.1:{procs[n][1]}", proto(n), 16, 0, 3)
            for _ in range(rounds):
                for n in names:
                    p, port = procs[n]
                    c0 = cpu(p.pid)
                    out = run_load(f"http://127.0.0.1:{port}", proto(n), 16, 0, 12)
                    ms = (cpu(p.pid) - c0) / max(out.requests, 1) * 1000
                    res[n].append((out.req_s, ms))
                    print(f"{n:14s} {out.req_s:6.1f} req/s  api {ms:.2f} ms/req", flush=True)
        finally:
            for n, (p, _) in procs.items():
                p.send_signal(signal.SIGINT if n in ("raw-asgi", "bare") else signal.SIGTERM)
            for p, _ in procs.values():
                try:
                    p.wait(60)
                except subprocess.TimeoutExpired:
                    p.kill()
    for n in names:
        rps = statistics.median(x for x, _ in res[n])
        ms = statistics.median(y for _, y in res[n])
        print(f"{n:14s} median {rps:6.1f} req/s  api {ms:.2f} ms/req")


if __name__ == "__main__":
    main()

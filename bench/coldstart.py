"""Cold starts, phase by phase: `vllm serve` with an empty and with its own warm cache, `evllm serve` with an
empty cache and with one `evllm prepare` built.

Both servers' engine phases are cut at the same vLLM log lines (`predictors.startup.EngineLog`). evllm
logs its own phases ("startup phase X took Y s"); vllm serve's front end is cut at its banner (imports)
and its "non-default args" line (flags parsed), with each line's arrival time read while it starts.
`vllm serve` runs as installed on its own: VLLM_PLUGINS="" keeps evllm's vLLM plugin (the compile cache
reload fix, registered when evllm is installed in the same environment) out of it.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

from predictors.startup import PHASES, EngineLog, Timeline

from .servers import MODEL_NAME, Server, engine_lock, running, timed_run

EVLLM_PHASE = re.compile(r"startup phase (\w+) took ([0-9.]+) s")
VLLM_FRONT = (("imports", "(APIServer pid="), ("settings", "non-default args"))


def vllm_phases(lines: list[tuple[float, str]], ready: float) -> dict[str, float]:
    timeline = Timeline("bench-vllm-serve", started=0.0)
    engine = EngineLog(timeline.end)
    front = list(VLLM_FRONT)
    for at, line in lines:
        if front and front[0][1] in line:
            timeline.end(front.pop(0)[0], at)
        elif not front:
            engine.feed(line, at)
    timeline.end("http_ready", ready)
    return dict(timeline.seconds)


def evllm_phases(lines: list[tuple[float, str]], ready: float) -> dict[str, float]:
    """evllm's own measurements; the bench notices readiness up to one poll (0.1 s) later: http_ready."""
    phases = {m[1]: float(m[2]) for _, line in lines if (m := EVLLM_PHASE.search(line))}
    phases["http_ready"] = phases.get("http_ready", 0.0) + max(ready - sum(phases.values()), 0.0)
    return {p: phases.get(p, 0.0) for p in PHASES}


def prepare(model_dir: Path, engine_args: list[str], env: dict[str, str], log_dir: Path) -> float:
    """`evllm prepare` with serve's flags: seconds, process start to exit."""
    cmd = [sys.executable, "-m", "evllm", "prepare", "--model_name", MODEL_NAME, "--model_dir", str(model_dir),
           *engine_args]  # fmt: skip
    return timed_run("evllm prepare", cmd, env, log_dir / "evllm-prepare.log")


def measure(bench: Any, rep: int) -> list[dict[str, Any]]:
    """One repeat: vllm fresh, vllm warm (same cache), evllm prepare, evllm fresh, evllm prepared."""
    caches = bench.work / f"caches-{rep}"
    out: list[dict[str, Any]] = []

    def start(kind: str, cache: str, env: dict[str, str]) -> None:
        srv = Server(kind, bench.model_dir, bench.engine_args(kind), {**bench.cfg.env, **env}, bench.logs)
        with running(srv):
            assert srv.cold_start is not None
            parse = vllm_phases if kind == "vllm" else evllm_phases
            phases = parse(srv.lines, srv.cold_start)
        bench.log(f"{kind} serve, {cache} cache: ready in {srv.cold_start:.1f}s")
        out.append(
            {"repeat": rep, "server": kind, "cache": cache, "seconds": srv.cold_start, "phases": phases}
        )

    vllm_env = {"VLLM_CACHE_ROOT": str(caches / "vllm-serve"), "VLLM_PLUGINS": ""}
    with engine_lock():
        start("vllm", "fresh", vllm_env)
        start("vllm", "warm", vllm_env)  # its own cache, as the first start left it
        prepared = {"EVLLM_CACHE_DIR": str(caches / "evllm-prepared")}
        secs = prepare(bench.model_dir, bench.engine_args("evllm"), {**bench.cfg.env, **prepared}, bench.logs)
        bench.log(f"evllm prepare: {secs:.1f}s")
        out.append({"repeat": rep, "server": "evllm", "cache": "prepare", "seconds": secs, "phases": {}})
        start("evllm", "fresh", {"EVLLM_CACHE_DIR": str(caches / "evllm-fresh")})
        start("evllm", "prepared", prepared)
    return out

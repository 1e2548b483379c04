"""A short smoke of the benchmark harness (`python -m bench --smoke`): real servers, tiny counts.

Benchmarks are not tests; this only checks that every part of the harness runs end to end (vllm serve,
run_batch, evllm serve with online load, a batch job and the priority run) and writes its report.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.server import ROOT


@pytest.mark.slow
def test_bench_smoke(tmp_path: Path) -> None:
    out = tmp_path / "results"
    # A subprocess, like `make bench-smoke`: the harness takes the engine lock itself, and this test
    # process must not hold it (the session server fixture does, once created).
    # vllm run-batch is left out: its engine start alone takes a minute here (make bench-smoke has it).
    cmd = [sys.executable, "-m", "bench", "--smoke", "--out", str(out)]
    proc = subprocess.run(
        [*cmd, "--sections", "online", "batch", "priority"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    series = {(r["server"], r["protocol"], r["concurrency"]) for r in results["online"]}
    for c in (1, 4):
        assert {("vllm", "openai", c), ("evllm", "openai", c), ("evllm", "v2-infer", c),
                ("evllm", "v2-generate", c)} <= series  # fmt: skip
    assert all(r["requests"] > 0 and r["errors"] == 0 for r in results["online"])
    assert {c["server"] for c in results["cold_start"]} == {"vllm", "evllm"}
    (job,) = results["batch"]
    assert job["runner"] == "evllm" and job["ok"] == results["config"]["batch_big"]
    assert job["tokens"] == 32 * results["config"]["batch_big"]
    assert {p["state"] for p in results["priority"]} == {"idle", "batch"}
    md = (out / "results.md").read_text()
    assert "| target | measured | goal | met |" in md and "evllm V2 generate" in md
    if importlib.util.find_spec("matplotlib") is not None:  # the `bench` extra
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

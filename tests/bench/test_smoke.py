"""The benchmark harness (`python -m bench`) end to end, without starting an engine: `--url` attaches it to
a running evllm serve and drives its load generator (OpenAI, V2 infer, V2 generate), a batch job and the
priority run, then writes the report.

Benchmarks are not tests; these only check that the harness runs and reports. The full harness with its
own servers (vllm serve, run-batch, evllm serve, cold starts) is `make bench-smoke`, outside `make test`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import json
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import bench.__main__ as bench_cli
from bench import batchjobs, load
from eventing.extension import Eventing
from tests import inprocess
from tests.eventing.fakes import openai_through_engine
from tests.server import ROOT, free_port

PROTOCOLS = ("openai", "v2-infer", "v2-infer-binary", "v2-generate")


def bench_args(url: str, storage: Path, out: Path, concurrency: list[int], duration: float) -> list[str]:
    return [
        "--smoke", "--url", url, "--storage", str(storage), "--out", str(out),
        "--concurrency", *map(str, concurrency), "--duration", str(duration), "--warmup", "0.2",
        "--batch-lines", "0", "8", "--priority-lines", "12", "--sections", "online", "batch", "priority",
    ]  # fmt: skip


def check_report(
    out: Path, url: str, concurrency: list[int], storage: Path, protocols: tuple[str, ...] = PROTOCOLS
) -> dict[str, Any]:
    results = json.loads((out / "results.json").read_text())
    assert results["attached"] == url and results["config"]["url"] == url
    series = {(r["server"], r["protocol"], r["concurrency"]) for r in results["online"]}
    assert series == {("evllm", p, c) for p in protocols for c in concurrency}
    assert all(r["requests"] > 0 and r["errors"] == 0 and r["tok_s"] > 0 for r in results["online"])
    assert results["cold_start"] == []  # nothing was started
    # The same 8 lines as a batch.submitted event and through the OpenAI Batch API (official client).
    jobs = {job["runner"]: job for job in results["batch"]}
    assert sorted(jobs) == ["evllm", "evllm-http"]
    for job in jobs.values():
        assert (job["lines"], job["ok"], job["tokens"]) == (8, 8, load.OUTPUT_TOKENS * 8)
    assert {p["state"] for p in results["priority"]} == {"idle", "batch"}
    busy = next(p for p in results["priority"] if p["state"] == "batch")
    assert busy["job_counts"] == {"total": 12, "completed": 12, "failed": 0}
    # The jobs ran in the given storage (the server's root), each in its own bench-* directory.
    assert list(storage.glob("bench-*/jobs/*/result.json"))
    md = (out / "results.md").read_text()
    assert md.startswith(f"# evllm serve at {url} (attached")
    for section in ("## Targets", "## Online (closed loop)", "## Batch (", "## Priority ("):
        assert section in md
    assert "| evllm-http |" in md
    assert "## Cold start" not in md and "| evllm+start |" not in md  # no cold start was measured
    labels = {"openai": "evllm OpenAI", "v2-infer": "evllm V2 infer", "v2-generate": "evllm V2 generate",
              "v2-infer-binary": "evllm V2 infer, binary tensors", "v2-grpc": "evllm V2 infer over gRPC"}  # fmt: skip
    for protocol in protocols:
        assert f"| {concurrency[0]} | {labels[protocol]} |" in md
    # The comparisons with vllm serve need its servers: reported as not measured, not as failures.
    assert f"| OpenAI throughput ratio, c={max(concurrency)} | - | ≥ 1.00 | not measured |" in md
    if importlib.util.find_spec("matplotlib") is not None:  # the `bench` extra
        assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    return results


@pytest.mark.slow
def test_bench_against_the_session_server(server, grpc_url: str, storage_root: Path, tmp_path: Path) -> None:
    """The harness as a user runs it, against the real engine (sink mode: jobs complete via the broker),
    gRPC included (the bench process loads Triton's protobufs, which the test process cannot)."""
    out, storage = tmp_path / "results", storage_root / "bench"
    storage.mkdir()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "bench",
            *bench_args(server.url, storage, out, [1, 4], 0.5),
            "--grpc",
            grpc_url,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    check_report(out, server.url, [1, 4], storage, (*PROTOCOLS, "v2-grpc"))


# Engine-free: the in-process server (fake engine) on a real port, as the load generator speaks HTTP -----
PROMPT = "a prompt of exactly 32 chars...."  # the fake engine: one token per character, 64 in all


@contextlib.contextmanager
def served(storage: Path) -> Iterator[str]:
    """tests/inprocess.py's server behind uvicorn, in a thread with its own event loop."""
    import uvicorn

    port = free_port()
    box: dict[str, Any] = {}

    async def main() -> None:
        async with inprocess.server(["--storage_roots", str(storage)], extensions=[Eventing()]) as s:
            openai_through_engine(s)  # completions with usage, as vLLM's answer (bench counts tokens)
            config = uvicorn.Config(s.app, host="127.0.0.1", port=port, lifespan="off", log_level="warning")
            box["server"] = uvicorn.Server(config)
            await box["server"].serve()

    thread = threading.Thread(target=lambda: asyncio.run(main()), daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not (box.get("server") and box["server"].started):
        assert thread.is_alive() and time.monotonic() < deadline, "in-process server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        box["server"].should_exit = True
        thread.join(30)


def test_bench_against_the_in_process_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert len(PROMPT) == load.OUTPUT_TOKENS == inprocess.MAX_MODEL_LEN // 2
    monkeypatch.setattr(load, "PROMPTS", [PROMPT])
    monkeypatch.setattr(batchjobs, "PROMPTS", [PROMPT])
    storage, out = tmp_path / "storage", tmp_path / "results"
    storage.mkdir()
    with served(storage) as url:
        assert bench_cli.main(bench_args(url, storage, out, [1, 2], 0.4)) == 0
    check_report(out, url, [1, 2], storage)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--url", "http://x"], "needs --storage"),
        (
            ["--url", "http://x", "--storage", "/s", "--sections", "online", "run_batch"],
            "run_batch starts its own",
        ),
        (["--storage", "/s"], "--storage goes with --url"),
    ],
)
def test_attached_mode_arguments(argv: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench_cli.main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_attached_mode_refuses_a_server_that_is_not_there(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"
    argv = ["--url", url, "--sections", "online", "--out", str(tmp_path), "--duration", "0.1"]
    with pytest.raises(RuntimeError, match=f"no ready evllm serve at {url}"):
        bench_cli.main(argv)

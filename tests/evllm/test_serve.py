"""`make serve`, the README's first command, on the real engine: the session server is started with its
command line and no VLLM_* variable (issue: the CPU engine used to refuse to start without one)."""

from __future__ import annotations

import json
import re

import httpx
import pytest

from tests.conftest import LORA_FLAGS, MODEL_NAME
from tests.server import ROOT, ServerProcess


def make_serve_args() -> list[str]:
    """The flags of the Makefile's `serve` recipe, with its variables' defaults filled in."""
    makefile = (ROOT / "Makefile").read_text()
    defaults = dict(re.findall(r"^(\w+) \?= (\S+)$", makefile, re.M))
    recipe = re.search(r"^serve:.*\n\t\$\(VENV\)/bin/evllm serve (.*)$", makefile, re.M)
    assert recipe, "Makefile has no `serve` recipe running evllm serve"
    args = re.sub(r"\$\((\w+)\)", lambda m: defaults[m[1]], recipe[1]).split()
    return [a for a in args if a not in ("--http_port", defaults["PORT"])]


@pytest.mark.slow
def test_the_session_server_runs_make_serves_command(server: ServerProcess) -> None:
    assert make_serve_args() == ["--model_name", "demo", "--model_dir", "demo", *LORA_FLAGS]
    base = make_serve_args()
    # Plus gRPC on a free port for the gRPC tests (`make serve` leaves it off): nothing else.
    assert server.args[: len(base)] == base
    assert server.args[len(base) :][:3] == ["--enable_grpc", "true", "--grpc_port"]
    assert len(server.args) == len(base) + 4
    assert not [k for k in server.env if k.startswith("VLLM_")]


@pytest.mark.slow
def test_it_chose_a_kv_cache_and_serves_a_generation(server: ServerProcess) -> None:
    log = server.log_path.read_text(errors="replace")
    chosen = [json.loads(line) for line in log.splitlines() if '"KV cache on CPU' in line]
    assert len(chosen) == 1 and "all the engine can use" in chosen[0]["message"], log[-3000:]
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": "Hello world", "parameters": {"max_tokens": 8, "temperature": 0}},
        timeout=60,
    )
    assert r.status_code == 200 and r.json()["completion_tokens"] == 8
    # Liveness answered while the engine was still starting (KServe's probes during a long cold start),
    # and the readiness polls of the start (on the model's ready path) logged no ERROR.
    assert server.live_before_ready
    start = log[: log.index('"engine ready: ')]
    assert '"level": "ERROR"' not in start and "ModelNotReady" not in start, start[-3000:]


def test_an_engine_that_cannot_start_exits_1_with_one_line(cache_dir) -> None:
    """Refused before the engine processes start (no engine lock needed, no engine started). The mapping
    of vLLM's own startup errors to a flag is unit-tested (tests/predictors)."""
    proc = ServerProcess(
        ["--model_name", MODEL_NAME, "--model_dir", "demo", "--kv-cache-memory-bytes", "100000G"],
        env={"EVLLM_CACHE_DIR": str(cache_dir)},
        log_name="cannot-start",
    )
    with pytest.raises(RuntimeError, match="server exited with 1"):
        proc.start(timeout=300)
    last = proc.tail(1)
    assert last.startswith("evllm serve: engine failed to start: the KV cache asked for"), last
    assert "--kv-cache-memory-bytes" in last


def test_prepare_takes_serves_flags_and_refuses_a_missing_model(tmp_path) -> None:
    """`evllm prepare` parses serve's command line (eventing's flags included) and refuses what serve
    refuses, before any engine starts."""
    import subprocess
    import sys

    empty = tmp_path / "models"
    empty.mkdir()
    cmd = [sys.executable, "-m", "evllm", "prepare", "--model_name", "llm", "--model_dir", str(empty),
           "--storage_roots", str(tmp_path), "--max-model-len", "256"]  # fmt: skip
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"--model_dir {empty}: no model there" in out.stderr
    helped = subprocess.run(
        [sys.executable, "-m", "evllm", "--help"], cwd=ROOT, capture_output=True, text=True
    )
    assert "prepare" in helped.stdout

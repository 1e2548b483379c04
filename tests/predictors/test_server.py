"""Composition root: flag parsing, health semantics, and what happens when the engine dies."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from predictors.server import parse_args
from tests.conftest import MODEL_NAME
from tests.server import _descendants


def test_kserve_flags_and_vllm_engine_flags_are_split(demo_model_dir):
    kargs, vargs = parse_args(
        [
            "--model_name", "m1",
            "--model_dir", str(demo_model_dir),
            "--http_port", "9999",
            "--max-model-len", "512",
            "--tensor-parallel-size", "1",
            "--enable-prefix-caching",
            "--gpu-memory-utilization", "0.8",
        ]
    )  # fmt: skip
    assert kargs.model_name == "m1" and kargs.http_port == 9999 and kargs.enable_grpc is False
    assert vargs.model == str(demo_model_dir)
    assert vargs.served_model_name == ["m1"]
    assert vargs.max_model_len == 512 and vargs.enable_prefix_caching is True
    assert vargs.gpu_memory_utilization == 0.8
    # Batch work runs below online traffic: priority scheduling unless the user chose otherwise.
    assert vargs.scheduling_policy == "priority"
    _, fcfs = parse_args(["--model_dir", str(demo_model_dir), "--scheduling-policy", "fcfs"])
    assert fcfs.scheduling_policy == "fcfs"


def test_without_a_model_the_demo_model_is_served(tmp_path, monkeypatch):
    monkeypatch.setenv("EVLLM_CACHE_DIR", str(tmp_path))
    _, vargs = parse_args([])
    assert vargs.model.startswith(str(tmp_path)) and os.path.exists(os.path.join(vargs.model, "config.json"))
    assert vargs.served_model_name == ["model"]  # KServe's default --model_name


def test_unknown_flag_is_a_usage_error(demo_model_dir):
    proc = subprocess.run(
        [sys.executable, "-m", "predictors", "--model_dir", str(demo_model_dir), "--no-such-flag"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "--no-such-flag" in proc.stderr


@pytest.mark.slow
def test_liveness_answers_while_the_engine_starts(server):
    # The engine is built off the event loop: a multi-minute GPU start must not fail liveness probes.
    assert server.live_before_ready


@pytest.mark.slow
def test_health_endpoints(server):
    assert httpx.get(server.url + "/v2/health/live").json() == {"live": True}
    assert httpx.get(server.url + "/v2/health/ready").json() == {"ready": True}
    assert httpx.get(f"{server.url}/v2/models/{MODEL_NAME}/ready").json()["ready"] is True


@pytest.mark.slow
@pytest.mark.kills_engine
def test_engine_death_is_503_and_not_ready(server):
    """Runs last (conftest orders it): SIGKILL the engine core under the session server."""
    cores = [
        pid
        for pid in _descendants(server.proc.pid)
        if "EngineCore" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
        or "EngineCore" in Path(f"/proc/{pid}/comm").read_text()
    ]
    assert cores, "no EngineCore process found under the server"
    # A stream in flight when the engine dies: headers are gone, so the error arrives in-band.
    with httpx.stream(
        "POST",
        f"{server.url}/v2/models/{MODEL_NAME}/generate_stream",
        json={"text_input": "Hello", "parameters": {"max_tokens": 900, "ignore_eos": True}},
        timeout=60,
    ) as stream:
        lines = stream.iter_lines()
        first = next(line for line in lines if line.startswith("data: "))
        assert "text_output" in json.loads(first.removeprefix("data: "))
        for pid in cores:
            os.kill(pid, signal.SIGKILL)
        events = [json.loads(line.removeprefix("data: ")) for line in lines if line.startswith("data: ")]
    assert "error" in events[-1], events[-3:]
    assert all("error" not in e for e in events[:-1])
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if httpx.get(server.url + "/v2/health/ready").status_code == 503:
            break
        time.sleep(0.5)
    assert httpx.get(server.url + "/v2/health/ready").status_code == 503
    assert httpx.get(f"{server.url}/v2/models/{MODEL_NAME}/ready").status_code == 503
    r = httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/generate", json={"text_input": "hi"}, timeout=30)
    assert r.status_code == 503 and "error" in r.json()
    r = httpx.post(
        f"{server.url}/v2/models/{MODEL_NAME}/infer",
        json={"inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["hi"]}]},
        timeout=30,
    )
    assert r.status_code == 503 and "error" in r.json()
    # Liveness fails too, so the kubelet restarts the pod instead of leaving a zombie replica.
    assert httpx.get(server.url + "/v2/health/live").status_code == 503

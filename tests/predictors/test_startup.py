"""Start-up phases: cut at vLLM's own log lines (a real vLLM 0.32 start, vendored), logged once, exported."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from predictors import compile_cache
from predictors.startup import PHASES, EngineLog, StdoutTap, Timeline

VLLM_LOG = Path(__file__).parent / "startup" / "vllm-0.32.0-cpu-fresh.log"


def gauge(model: str, phase: str) -> float | None:
    return REGISTRY.get_sample_value("evllm_startup_seconds", {"model": model, "phase": phase})


def test_phases_are_consecutive_logged_once_and_exported(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "evllm.startup")
    timeline = Timeline("startup-a", started=100.0)
    timeline.end("imports", 102.5)
    timeline.end("settings", 103.0)
    timeline.end("weights", 110.0)  # engine_process was never announced: 0 s, and weights gets the gap
    timeline.end("weights", 111.0)  # a phase ends once
    timeline.end("http_ready", 140.0)
    assert timeline.seconds == {
        "imports": 2.5, "settings": 0.5, "engine_process": 0.0, "weights": 7.0, "compile": 0.0,
        "kv_cache": 0.0, "http_ready": 30.0,
    }  # fmt: skip
    assert timeline.total == 40.0
    assert [gauge("startup-a", p) for p in PHASES] == [2.5, 0.5, 0.0, 7.0, 0.0, 0.0, 30.0]
    lines = [r.getMessage() for r in caplog.records]
    assert lines.count("startup phase weights took 7.00 s") == 1
    assert lines[-1] == "ready 40.00 s after process start"


def test_engine_phases_from_a_real_vllm_start() -> None:
    """vLLM's lines carry whole seconds; the line number stands in for the arrival time here."""
    seen: list[tuple[str, float]] = []
    log = EngineLog(lambda phase, at: seen.append((phase, at)))
    lines = VLLM_LOG.read_text().splitlines()
    for number, line in enumerate(lines):
        log.feed(line, float(number))
    assert log.done
    assert [phase for phase, _ in seen] == ["engine_process", "weights", "compile", "kv_cache"]
    at = dict(seen)
    assert "Starting to load model" in lines[int(at["engine_process"])]
    assert "Loading weights took" in lines[int(at["weights"])]
    assert "Warming up done." in lines[int(at["compile"])]  # the CPU runner's compile + warm-up bracket
    assert "init engine (profile, create kv cache, warmup model) took" in lines[int(at["kv_cache"])]


def test_a_marker_before_its_turn_is_not_taken() -> None:
    seen: list[str] = []
    log = EngineLog(lambda phase, at: seen.append(phase))
    log.feed(
        "init engine (profile, create kv cache, warmup model) took 3.00 s", 1.0
    )  # kv_cache, skipping ahead
    log.feed("Starting to load model /m...", 2.0)  # earlier markers are no longer looked for
    assert seen == ["kv_cache"] and log.done


def test_the_tap_sees_child_processes_lines_and_forwards_every_byte(
    capfd: pytest.CaptureFixture[str],
) -> None:
    seen: list[str] = []
    tap = StdoutTap(lambda line, at: seen.append(line))
    tap.open()
    try:
        # A child started while the tap is open inherits it, as vLLM's engine core does.
        child = subprocess.Popen(
            [sys.executable, "-c", "print('Starting to load model x'); print('tail', end='')"]
        )
    finally:
        tap.close()
    print("after close", flush=True)  # this process writes to the real stdout again
    assert child.wait(timeout=30) == 0
    out = ""
    for _ in range(100):  # the forwarder runs in its own thread
        out += capfd.readouterr().out
        if "tail" in out:
            break
        time.sleep(0.05)
    assert "Starting to load model x\n" in out and "tail" in out and "after close" in out
    assert seen == ["Starting to load model x"]  # a line is fed once complete


def test_the_compile_cache_follows_cache_dir_unless_vllm_cache_root_is_set(tmp_path: Path) -> None:
    env: dict[str, str] = {}
    assert compile_cache.use(str(tmp_path), env) == tmp_path / "vllm"
    assert env == {"VLLM_CACHE_ROOT": str(tmp_path / "vllm"), "HF_HOME": str(tmp_path / "huggingface")}
    env = {"VLLM_CACHE_ROOT": "/elsewhere", "HF_HOME": "/hf"}
    assert compile_cache.use(str(tmp_path), env) == Path("/elsewhere")
    assert env == {"VLLM_CACHE_ROOT": "/elsewhere", "HF_HOME": "/hf"}


def test_a_read_only_prepared_cache_is_copied_to_a_writable_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prepared = tmp_path / "vllm"
    (prepared / "torch_compile_cache").mkdir(parents=True)
    (prepared / "torch_compile_cache" / "artifact").write_text("compiled")
    # A read-only volume (root ignores permission bits, so the check is what is replaced here).
    monkeypatch.setattr(compile_cache.os, "access", lambda path, mode: Path(path) != prepared)
    monkeypatch.setattr(compile_cache.tempfile, "gettempdir", lambda: str(tmp_path / "tmp"))
    env: dict[str, str] = {}
    used = compile_cache.use(str(tmp_path), env)
    assert used == tmp_path / "tmp" / "evllm-vllm-cache"
    assert (used / "torch_compile_cache" / "artifact").read_text() == "compiled"
    assert env["VLLM_CACHE_ROOT"] == str(used)


def test_the_aot_reload_fix_gives_torchs_wrapper_a_finalize_step() -> None:
    from torch._dynamo.aot_compile_types import BundledAOTAutogradSerializableCallable as Bundled

    compile_cache.register()
    compile_cache.register()  # loaded once per vLLM process, possibly more: idempotent
    wrapped = Bundled.__new__(Bundled)
    wrapped.compiled_fn = lambda *args: args  # what deserialize_compile_artifacts wraps: a plain function
    assert wrapped.finalize_loading(vllm_config=None) is None  # vLLM's call no longer raises
    assert wrapped(1, 2) == (1, 2)


@pytest.mark.slow
def test_the_real_server_exports_every_phase_of_its_start(server) -> None:  # type: ignore[no-untyped-def]
    import httpx

    from tests.predictors.harness import samples

    now = samples(httpx.get(server.url + "/metrics", timeout=30).text)
    seconds = {p: now[f'evllm_startup_seconds{{model="demo",phase="{p}"}}'] for p in PHASES}
    # The engine phases were cut at vLLM's own lines, seen through the tap: each took time.
    for phase in ("imports", "engine_process", "weights", "kv_cache", "http_ready"):
        assert seconds[phase] > 0, (phase, seconds)
    assert all(s >= 0 for s in seconds.values())

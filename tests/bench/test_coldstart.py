"""bench/coldstart.py's phase parsing on a real `vllm serve` start's lines and on evllm's own phase lines."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.coldstart import evllm_phases, vllm_phases
from predictors.startup import PHASES

VLLM_LOG = Path(__file__).parents[1] / "predictors" / "startup" / "vllm-0.32.0-cpu-fresh.log"


def test_vllm_serve_is_cut_at_its_banner_its_flags_and_the_engine_lines() -> None:
    lines = VLLM_LOG.read_text().splitlines()
    stamped = [(float(i), line) for i, line in enumerate(lines)]  # line number as arrival time
    phases = vllm_phases(stamped, ready=100.0)
    assert list(phases) == list(PHASES)
    first = next(i for i, line in enumerate(lines) if "(APIServer pid=" in line)
    flags = next(i for i, line in enumerate(lines) if "non-default args" in line)
    load = next(i for i, line in enumerate(lines) if "Starting to load model" in line)
    ready_line = next(i for i, line in enumerate(lines) if "init engine (profile" in line)
    assert phases["imports"] == first
    assert phases["settings"] == flags - first
    assert phases["engine_process"] == load - flags
    assert phases["http_ready"] == 100.0 - ready_line
    assert sum(phases.values()) == 100.0


def test_evllm_reports_its_own_phases_and_the_poll_delay_counts_as_http_ready() -> None:
    lines = [
        (1.0, '{"level": "INFO", "logger": "evllm.startup", "message": "startup phase imports took 2.50 s"}'),
        (2.0, '{"message": "startup phase settings took 1.00 s"}'),
        (9.0, "(EngineCore pid=1) INFO init engine (profile, create kv cache, warmup model) took 3.00 s"),
        (9.5, '{"message": "startup phase kv_cache took 6.00 s"}'),
        (9.6, '{"message": "startup phase http_ready took 0.20 s"}'),
    ]
    phases = evllm_phases(lines, ready=10.0)
    assert phases == pytest.approx({"imports": 2.5, "settings": 1.0, "engine_process": 0.0, "weights": 0.0,
                                    "compile": 0.0, "kv_cache": 6.0, "http_ready": 0.5})  # fmt: skip

"""`python -m bench.fairness` runs and reports both schedules (a figure, not a timed assertion: the
scheduling property itself is tested in tests/eventing/test_fair_sharing.py)."""

from __future__ import annotations

import json

import pytest

from bench import fairness


def test_fairness_bench_reports_both_schedules(capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--small", "8", "--huge-chunks", "4", "--chunk", "8", "--slots", "2", "--line-seconds", "0.001"]
    assert fairness.main(argv) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["small_lines"] == 8 and report["huge_lines_in_flight_chunks"] == 32
    for key in ("small_alone_s", "small_beside_huge_round_robin_s", "small_beside_huge_one_queue_s"):
        assert report[key] > 0
    assert report["round_robin_ratio"] == report["small_beside_huge_round_robin_s"] / report["small_alone_s"]

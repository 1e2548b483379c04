"""bench/report.py on a synthetic A/B run (no servers): medians, per-repeat ratios, targets, markdown."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from bench.report import summarize, write


def online(rep: int, server: str, protocol: str, c: int, tok_s: float, p50: float) -> dict[str, Any]:
    return {"repeat": rep, "server": server, "protocol": protocol, "concurrency": c, "duration": 10.0,
            "requests": 100, "errors": 0, "req_s": tok_s / 32, "tok_s": tok_s, "p50": p50, "p95": 2 * p50,
            "p99": 3 * p50}  # fmt: skip


def results() -> dict[str, Any]:
    rows = []
    for rep, scale in ((0, 1.0), (1, 2.0)):  # the second repeat on a twice faster machine
        for c in (1, 16):
            rows.append(online(rep, "vllm", "openai", c, 1000 * scale, 0.100 / scale))
            rows.append(online(rep, "evllm", "openai", c, 1100 * scale, 0.102 / scale))
            rows.append(online(rep, "evllm", "v2-infer", c, 1000 * scale, 0.100 / scale))
            rows.append(online(rep, "evllm", "v2-infer-binary", c, 1050 * scale, 0.100 / scale))
            rows.append(online(rep, "evllm", "v2-generate", c, 1200 * scale, 0.090 / scale))
    batch = []
    for rep in (0, 1):
        # run_batch: 20 s + 100 s for 1000 more lines; evllm: 2 s + 105 s (after a 10 s cold start).
        batch += [
            {"repeat": rep, "runner": "run_batch", "lines": 100, "seconds": 20.0, "ok": 100, "tokens": 3200},
            {"repeat": rep, "runner": "run_batch", "lines": 1100, "seconds": 120.0, "ok": 1100, "tokens": 35200},
            {"repeat": rep, "runner": "evllm", "lines": 100, "seconds": 2.0, "ok": 100, "tokens": 3200,
             "cold_start": 10.0},
            {"repeat": rep, "runner": "evllm", "lines": 1100, "seconds": 107.0, "ok": 1100, "tokens": 35200,
             "cold_start": 10.0},
        ]  # fmt: skip
    priority = []
    for rep in (0, 1):
        priority += [{**online(rep, "evllm", "openai", 4, 500, 0.05), "state": "idle"},
                     {**online(rep, "evllm", "openai", 4, 450, 0.06), "state": "batch",
                      "batch_running_throughout": True}]  # fmt: skip
    return {
        "config": {
            "concurrencies": [1, 16],
            "batch_small": 100,
            "batch_big": 1100,
            "chunk_size": 1024,
            "engine_args": ["--dtype", "float32"],
            "vllm_policy": "priority",
            "env": {},
            "warmup": 2.0,
            "duration": 10.0,
            "priority_concurrency": 4,
            "priority_lines": 4000,
            "repeats": 2,
        },
        "machine": {"nproc": "2", "cpu": "x", "mem_gib": 8, "python": "3.11", "kernel": "k", "vllm": "v"},
        "online": rows,
        "cold_start": [
            {"repeat": r, "server": s, "seconds": t}
            for r in (0, 1)
            for s, t in (("vllm", 10.0), ("evllm", 10.2))
        ],
        "batch": batch,
        "priority": priority,
        "startup": startup_rows(),
        # LoRA at c=16: evllm 3% above vllm serve in both repeats (the second twice as fast).
        "lora": [
            {**online(rep, server, "openai-lora", 16, tok * scale, 0.1 / scale)}
            for rep, scale in ((0, 1.0), (1, 2.0))
            for server, tok in (("vllm", 800.0), ("evllm", 824.0))
        ],
    }


def startup_rows() -> list[dict[str, Any]]:
    rows = []
    for rep, scale in ((0, 1.0), (1, 2.0)):
        for server, cache, compile_s in (("vllm", "fresh", 16.0), ("vllm", "warm", 6.0),
                                         ("evllm", "fresh", 16.0), ("evllm", "prepared", 2.0)):  # fmt: skip
            phases = {"imports": 3.0, "settings": 1.0, "engine_process": 10.0, "weights": 1.0,
                      "compile": compile_s, "kv_cache": 4.0, "http_ready": 1.0}  # fmt: skip
            phases = {p: x * scale for p, x in phases.items()}
            rows.append({"repeat": rep, "server": server, "cache": cache, "seconds": sum(phases.values()),
                         "phases": phases})  # fmt: skip
        rows.append({"repeat": rep, "server": "evllm", "cache": "prepare", "seconds": 40.0, "phases": {}})
    return rows


def test_summary_ratios_are_per_repeat_and_targets_judge_them() -> None:
    s = summarize(results())
    targets = {t["target"]: t for t in s["targets"]}
    assert math.isclose(targets["OpenAI throughput ratio, c=16"]["value"], 1.1)
    assert math.isclose(targets["OpenAI p50 ratio, c=1"]["value"], 1.02)
    assert math.isclose(targets["V2 generate / vllm OpenAI throughput, c=16"]["value"], 1.2)
    assert math.isclose(targets["V2 infer / vllm OpenAI throughput, c=16"]["value"], 1.0)
    # Marginal: 1000 lines / 32000 tokens in 100 s (run_batch) vs 105 s (evllm).
    assert math.isclose(targets["batch marginal tok/s / run-batch"]["value"], 100 / 105)
    assert math.isclose(targets["online p95 under batch / idle"]["value"], 1.2)
    assert math.isclose(targets["cold start evllm / vllm serve"]["value"], 1.02)
    # Start to ready: prepared evllm 22 s, vllm serve 36 s fresh and 26 s warm (per repeat, same ratio).
    assert math.isclose(targets["prepared evllm start / vllm serve fresh"]["value"], 22 / 36)
    assert math.isclose(targets["prepared evllm start / vllm serve warm"]["value"], 22 / 26)
    assert s["startup"]["rows"][3]["phases"]["compile"] == 3.0  # median of 2 s and 4 s
    assert math.isclose(targets["LoRA throughput ratio (base + adapter), c=16"]["value"], 1.03)
    met = {name: t["met"] for name, t in targets.items()}
    assert met == {
        "OpenAI throughput ratio, c=16": True,
        "OpenAI p50 ratio, c=1": True,
        "V2 generate / vllm OpenAI throughput, c=16": True,
        "V2 infer / vllm OpenAI throughput, c=16": True,
        "batch marginal tok/s / run-batch": True,
        "online p95 under batch / idle": True,
        "cold start evllm / vllm serve": True,
        "prepared evllm start / vllm serve fresh": False,  # 0.61 > 0.6
        "prepared evllm start / vllm serve warm": True,
        "LoRA throughput ratio (base + adapter), c=16": True,
        "V2 infer p99 / vllm OpenAI p99, c=16": True,  # 1.0
        "V2 infer p50 / vllm OpenAI p50, c=1": True,  # 1.0
        "V2 generate p99 / vllm OpenAI p99, c=16": True,  # 0.9
        "V2 generate p50 / vllm OpenAI p50, c=1": True,  # 0.9
        "V2 infer binary / JSON throughput, c=16": True,  # 1.05
    }
    # End to end incl. the engine start: evllm 117 s vs run_batch 120 s for the big job.
    assert math.isclose(s["batch"]["e2e_ratio_with_start"], 120 / 117)


def test_markdown_has_every_section(tmp_path: Path) -> None:
    write(results(), tmp_path)
    md = (tmp_path / "results.md").read_text()
    assert md.startswith("# evllm vs `vllm serve` / `vllm run-batch`")
    assert "2 repeat(s). Online and LoRA: vllm serve and evllm serve both up" in md
    for section in ("## Targets", "## Online (closed loop)", "## Batch (1100 and 100", "## Priority (",
                    "## Cold start", "## LoRA ("):  # fmt: skip
        assert section in md
    assert "| 16 | evllm V2 generate | 56.2 | 1800 |" in md  # medians of the two repeats
    assert "| evllm+start | 12.0 | 117.0 |" in md
    assert "| evllm | prepared | 33.0 | 4.5 | 1.5 | 15.0 | 1.5 | 3.0 | 6.0 | 1.5 |" in md
    assert "`evllm prepare`: 40.0 s" in md
    assert "| evllm | 1236 |" in md and "beside it): **1.03** (each window: 1.03 1.03)" in md
    assert "not measured" not in md


def test_paired_windows_divide_by_the_vllm_windows_beside_them() -> None:
    """A B A C A: each evllm window against the mean of the vllm serve windows just before and after it,
    so a machine that drifts between windows does not move the ratio."""
    r = results()
    r["config"]["concurrencies"] = [16]
    rows = []
    for window, (server, protocol, tok) in enumerate(
        [
            ("vllm", "openai", 1000),
            ("evllm", "v2-generate", 1650),
            ("vllm", "openai", 2000),
            ("evllm", "v2-infer", 2200),
            ("vllm", "openai", 2000),
            ("evllm", "v2-infer", 1650),
            ("vllm", "openai", 1000),
        ]
    ):
        rows.append({**online(0, server, protocol, 16, tok, 0.1), "window": window})
    r["online"] = rows
    s = summarize(r)
    gen = next(x for x in s["online"] if x["series"] == "evllm V2 generate")
    infer = next(x for x in s["online"] if x["series"] == "evllm V2 infer")
    assert math.isclose(gen["tok_ratio"], 1.1)  # 1650 / mean(1000, 2000)
    assert infer["tok_ratios"] == [1.1, 1.1]  # 2200 / 2000, then 1650 / mean(2000, 1000)
    assert math.isclose(infer["tok_ratio"], 1.1)

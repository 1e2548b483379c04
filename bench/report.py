"""results.json -> results.md (tables, targets) and bench.png."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

SERIES = [
    ("vllm", "openai"),
    ("evllm", "openai"),
    ("evllm", "v2-infer"),
    ("evllm", "v2-infer-binary"),
    ("evllm", "v2-generate"),
    ("evllm", "v2-grpc"),
]
LABEL = {
    ("vllm", "openai"): "vllm serve OpenAI",
    ("evllm", "openai"): "evllm OpenAI",
    ("evllm", "v2-infer"): "evllm V2 infer",
    ("evllm", "v2-infer-binary"): "evllm V2 infer, binary tensors",
    ("evllm", "v2-generate"): "evllm V2 generate",
    ("evllm", "v2-grpc"): "evllm V2 infer over gRPC",
}


def med(xs: list[float]) -> float:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    return statistics.median(xs) if xs else float("nan")


def _online(results: dict[str, Any]) -> dict[tuple[str, str, int], list[dict[str, Any]]]:
    by: dict[tuple[str, str, int], list[dict[str, Any]]] = defaultdict(list)
    for r in results["online"]:
        by[(r["server"], r["protocol"], r["concurrency"])].append(r)
    return by


def _baseline(base_rows: list[dict[str, Any]], row: dict[str, Any], metric: str) -> float:
    """vllm serve's `metric` beside `row` (same repeat and concurrency): the mean of the vllm serve windows
    just before and just after it; for results without window numbers (sessions, older runs), the mean of
    the repeat's vllm serve windows."""
    same = [b for b in base_rows if b["repeat"] == row["repeat"] and b[metric]]
    if "window" in row and all("window" in b for b in same):
        before = [b for b in same if b["window"] < row["window"]]
        after = [b for b in same if b["window"] > row["window"]]
        same = [max(before, key=lambda b: b["window"])] if before else []
        same += [min(after, key=lambda b: b["window"])] if after else []
    return statistics.fmean(b[metric] for b in same) if same else float("nan")


def ratios(rows: list[dict[str, Any]], base_rows: list[dict[str, Any]], metric: str) -> list[float]:
    """Each window's `metric` over vllm serve's beside it, in window order."""
    ordered = sorted(rows, key=lambda r: (r["repeat"], r.get("window", 0)))
    return [r[metric] / _baseline(base_rows, r, metric) for r in ordered]


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    s: dict[str, Any] = {"online": [], "batch": {}, "priority": {}, "cold_start": {}}
    by = _online(results)
    for c in results["config"]["concurrencies"]:
        for key in SERIES:
            rows = by.get((*key, c))
            if not rows:
                continue
            base = by[("vllm", "openai", c)]
            is_base = key == ("vllm", "openai")
            s["online"].append({
                "concurrency": c, "series": LABEL[key], "repeats": len(rows),
                **{m: med([r[m] for r in rows]) for m in ("req_s", "tok_s", "p50", "p95", "p99")},
                "errors": sum(r["errors"] for r in rows),
                **{f"{m}_ratio": 1.0 if is_base else med(ratios(rows, base, f"{m}_s" if m == "tok" else m))
                   for m in ("tok", "p50", "p99")},
                "tok_ratios": [] if is_base else ratios(rows, base, "tok_s"),
            })  # fmt: skip
    # Batch: end-to-end and marginal rates, per repeat, then medians.
    cfg = results["config"]
    small, big = cfg["batch_small"], cfg["batch_big"]
    per: dict[tuple[str, int], dict[int, dict[str, Any]]] = defaultdict(dict)
    for b in results["batch"]:
        per[(b["runner"], b["repeat"])][b["lines"]] = b
    marg: dict[str, list[float]] = defaultdict(list)
    e2e: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))
    for (runner, _rep), sizes in per.items():
        for n, b in sizes.items():
            e2e[runner][n].append(b["seconds"])
            if runner == "evllm" and b.get("cold_start") is not None:  # None: attached (--url)
                e2e["evllm+start"][n].append(b["seconds"] + b["cold_start"])
        if small in sizes and big in sizes and sizes[big]["seconds"] > sizes[small]["seconds"]:
            dt = sizes[big]["seconds"] - sizes[small]["seconds"]
            marg[runner + ":lines"].append((sizes[big]["ok"] - sizes[small]["ok"]) / dt)
            marg[runner + ":tok"].append((sizes[big]["tokens"] - sizes[small]["tokens"]) / dt)
    for runner, sizes in e2e.items():
        s["batch"][runner] = {
            "e2e_seconds": {n: med(v) for n, v in sizes.items()},
            "e2e_tok_s_big": (big * 32) / med(sizes[big]) if sizes.get(big) else float("nan"),
            "marginal_lines_s": med(marg.get(runner + ":lines", [])),
            "marginal_tok_s": med(marg.get(runner + ":tok", [])),
            "repeats": len(sizes.get(big, [])),
        }
    if "run_batch" in s["batch"] and "evllm" in s["batch"]:
        rb, ev = s["batch"]["run_batch"], s["batch"]["evllm"]
        s["batch"]["marginal_ratio"] = ev["marginal_tok_s"] / rb["marginal_tok_s"]
        s["batch"]["e2e_ratio_with_start"] = s["batch"]["evllm+start"]["e2e_tok_s_big"] / rb["e2e_tok_s_big"]
    if "run_batch" in s["batch"] and "evllm-http" in s["batch"]:
        s["batch"]["http_marginal_ratio"] = (
            s["batch"]["evllm-http"]["marginal_tok_s"] / s["batch"]["run_batch"]["marginal_tok_s"]
        )
    # Priority: p95 under batch / idle p95, per repeat.
    pr: dict[int, dict[str, Any]] = defaultdict(dict)
    for p in results["priority"]:
        pr[p["repeat"]][p["state"]] = p
    pairs = [(v["idle"], v["batch"]) for v in pr.values() if "idle" in v and "batch" in v]
    if pairs:
        s["priority"] = {
            "p95_idle": med([i["p95"] for i, _ in pairs]),
            "p95_batch": med([b["p95"] for _, b in pairs]),
            "p50_idle": med([i["p50"] for i, _ in pairs]),
            "p50_batch": med([b["p50"] for _, b in pairs]),
            "ratio": med([b["p95"] / i["p95"] for i, b in pairs]),
            "batch_running_throughout": all(b.get("batch_running_throughout") for _, b in pairs),
            "repeats": len(pairs),
        }
    cs: dict[str, dict[int, float]] = defaultdict(dict)
    for c in results["cold_start"]:
        cs[c["server"]][c["repeat"]] = c["seconds"]
    if cs.get("vllm") and cs.get("evllm"):
        s["cold_start"] = {
            "vllm": med(list(cs["vllm"].values())),
            "evllm": med(list(cs["evllm"].values())),
            "ratio": med([cs["evllm"][r] / cs["vllm"][r] for r in cs["evllm"] if r in cs["vllm"]]),
            "repeats": len(cs["evllm"]),
        }
    s["startup"] = startup(results.get("startup", []))
    # LoRA: evllm / vllm serve throughput with the same LoRA flags, each evllm window against vllm
    # serve's beside it.
    lora_rows = results.get("lora", [])
    lv = [r for r in lora_rows if r["server"] == "vllm"]
    le = [r for r in lora_rows if r["server"] == "evllm"]
    if lv and le:
        per = ratios(le, lv, "tok_s")
        s["lora"] = {
            "concurrency": le[0]["concurrency"],
            **{f"{k}_{m}": med([r[m] for r in rows]) for k, rows in (("vllm", lv), ("evllm", le))
               for m in ("tok_s", "p50", "p95")},
            "errors": sum(r["errors"] for r in lora_rows),
            "ratio": med(per),
            "ratios": per,
            "repeats": len({r["repeat"] for r in le}),
        }  # fmt: skip
    s["targets"] = targets(s, results)
    return s


STARTUP_ROWS = (("vllm", "fresh"), ("vllm", "warm"), ("evllm", "fresh"), ("evllm", "prepared"))


def startup(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians per (server, cache) and phase; ratios of evllm's prepared start to vllm serve's, per repeat."""
    from predictors.startup import PHASES

    by: dict[tuple[str, str], dict[int, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        by[(r["server"], r["cache"])][r["repeat"]] = r
    if not by:
        return {}
    out: dict[str, Any] = {"rows": [], "repeats": len({r["repeat"] for r in rows})}
    for key in STARTUP_ROWS:
        runs = list(by.get(key, {}).values())
        if runs:
            out["rows"].append({
                "server": key[0], "cache": key[1], "seconds": med([r["seconds"] for r in runs]),
                "phases": {p: med([r["phases"].get(p, 0.0) for r in runs]) for p in PHASES},
            })  # fmt: skip
    prepare_runs = list(by.get(("evllm", "prepare"), {}).values())
    out["prepare_seconds"] = med([r["seconds"] for r in prepare_runs]) if prepare_runs else None
    prepared = by.get(("evllm", "prepared"), {})
    for name, base in (("vs_vllm_fresh", ("vllm", "fresh")), ("vs_vllm_warm", ("vllm", "warm"))):
        other = by.get(base, {})
        xs = [prepared[r]["seconds"] / other[r]["seconds"] for r in prepared if r in other]
        out[f"prepared_{name}"] = med(xs) if xs else None
    return out


def _find(s: dict[str, Any], series: str, c: int) -> dict[str, Any] | None:
    return next((r for r in s["online"] if r["series"] == series and r["concurrency"] == c), None)


def targets(s: dict[str, Any], results: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    cs = results["config"]["concurrencies"]
    mid = 16 if 16 in cs else max(cs)

    def add(name: str, value: float | None, goal: float, higher: bool) -> None:
        if value is None or math.isnan(value):
            out.append({"target": name, "value": None, "goal": goal, "met": None})
            return
        out.append({"target": name, "value": value, "goal": goal,
                    "met": value >= goal if higher else value <= goal})  # fmt: skip

    row = _find(s, "evllm OpenAI", mid)
    add(f"OpenAI throughput ratio, c={mid}", row and row["tok_ratio"], 1.00, True)
    row = _find(s, "evllm OpenAI", 1)
    add("OpenAI p50 ratio, c=1", row and row["p50_ratio"], 1.05, False)
    row = _find(s, "evllm V2 generate", mid)
    add(f"V2 generate / vllm OpenAI throughput, c={mid}", row and row["tok_ratio"], 1.15, True)
    row = _find(s, "evllm V2 infer", mid)
    add(f"V2 infer / vllm OpenAI throughput, c={mid}", row and row["tok_ratio"], 1.00, True)
    for series in ("evllm V2 infer", "evllm V2 generate"):
        row = _find(s, series, mid)
        add(f"{series[6:]} p99 / vllm OpenAI p99, c={mid}", row and row["p99_ratio"], 1.2, False)
        row = _find(s, series, 1)
        add(f"{series[6:]} p50 / vllm OpenAI p50, c=1", row and row["p50_ratio"], 1.05, False)
    binary, json_ = _find(s, "evllm V2 infer, binary tensors", mid), _find(s, "evllm V2 infer", mid)
    add(
        f"V2 infer binary / JSON throughput, c={mid}",
        binary and json_ and binary["tok_ratio"] / json_["tok_ratio"],
        1.00,
        True,
    )
    add("batch marginal tok/s / run-batch", s["batch"].get("marginal_ratio"), 0.95, True)
    add("online p95 under batch / idle", s["priority"].get("ratio"), 1.3, False)
    add("cold start evllm / vllm serve", s["cold_start"].get("ratio"), 1.05, False)
    add("prepared evllm start / vllm serve fresh", s["startup"].get("prepared_vs_vllm_fresh"), 0.6, False)
    add("prepared evllm start / vllm serve warm", s["startup"].get("prepared_vs_vllm_warm"), 1.0, False)
    lora = s.get("lora") or {}
    add(
        f"LoRA throughput ratio (base + adapter), c={lora.get('concurrency', 16)}",
        lora.get("ratio"),
        1.00,
        True,
    )
    return out


def _f(x: Any, fmt: str = "{:.2f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    return fmt.format(x)


def markdown(results: dict[str, Any], s: dict[str, Any]) -> str:
    m, cfg = results["machine"], results["config"]
    load = (
        f"Load: closed loop, fixed prompts, 32 output tokens, ignore_eos, greedy; warmup {cfg['warmup']} s, "
        f"{cfg['duration']} s measured per point; "
    )
    attached = results.get("attached")
    if attached:
        head = [
            f"# evllm serve at {attached} (attached: no `vllm serve` / `run-batch` comparison)",
            "",
            f"Machine: {m['nproc']} cores ({m['cpu']}), {m['mem_gib']} GiB RAM; vLLM {m['vllm']} installed here, "
            f"Python {m['python']}, kernel {m['kernel']}.",
            "Server: already running when the bench started, with its own model and engine args; nothing "
            "was started here (no cold start).",
            load + f"{len({r['repeat'] for r in results['online']})} repeat(s); figures are medians.",
        ]
    else:
        head = [
            "# evllm vs `vllm serve` / `vllm run-batch`",
            "",
            f"Machine: {m['nproc']} cores ({m['cpu']}), {m['mem_gib']} GiB RAM, no GPU; vLLM {m['vllm']} (CPU), "
            f"Python {m['python']}, kernel {m['kernel']}.",
            f"Model: the demo tiny Llama; engine args `{' '.join(cfg['engine_args'])}` on every engine "
            f"(+ `--scheduling-policy {cfg['vllm_policy']}` for vllm serve / run_batch, evllm's default), "
            f"env {cfg['env']}.",
            load + f"{len({c['repeat'] for c in results['cold_start']})} repeat(s). "
            "Online and LoRA: vllm serve and evllm serve both up, one loaded at a time, every evllm window "
            "between two vllm serve windows (A B A C A ...); a ratio divides an evllm window by the mean "
            "of the vllm serve windows beside it; figures are medians over windows.",
        ]
    lines = [
        *head,
        "",
        "## Targets",
        "",
        "| target | measured | goal | met |",
        "|---|---|---|---|",
    ]
    for t in s["targets"]:
        cmp = "≥" if "throughput" in t["target"] or "batch marginal" in t["target"] else "≤"
        met = {True: "yes", False: "**no**", None: "not measured"}[t["met"]]
        lines.append(f"| {t['target']} | {_f(t['value'])} | {cmp} {t['goal']:.2f} | {met} |")
    lines += [
        "",
        "## Online (closed loop)",
        "",
        "| conc. | series | req/s | output tok/s | p50 ms | p95 ms | p99 ms | tok/s ÷ vllm | p50 ÷ vllm "
        "| p99 ÷ vllm | tok/s ÷ vllm, each window |",
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in s["online"]:
        lines.append(
            f"| {r['concurrency']} | {r['series']} | {_f(r['req_s'], '{:.1f}')} | {_f(r['tok_s'], '{:.0f}')} "
            f"| {_f(r['p50'] * 1e3, '{:.1f}')} | {_f(r['p95'] * 1e3, '{:.1f}')} | {_f(r['p99'] * 1e3, '{:.1f}')} "
            f"| {_f(r['tok_ratio'])} | {_f(r['p50_ratio'])} | {_f(r['p99_ratio'])} "
            f"| {' '.join(_f(x) for x in r['tok_ratios'])} |"
        )
    b = s["batch"]
    if b:
        small, big = cfg["batch_small"], cfg["batch_big"]
        lines += [
            "",
            f"## Batch ({big} and {small} /v1/chat/completions lines, 32 tokens each)",
            "",
            f"evllm: a `batch.submitted` CloudEvent to a running `evllm serve` (chunk_size "
            f"{cfg['chunk_size'] or 'default'}), timed from submit to `result.json`; "
            "`+start` adds that server's cold start. evllm-http: the same lines through the OpenAI Batch API "
            "on the same server (official client: upload, create, poll until completed). run_batch: process "
            "start to exit.",
            "",
            f"| runner | {small} lines s | {big} lines s | e2e tok/s ({big}) | marginal lines/s | marginal tok/s |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for runner in ("run_batch", "evllm", "evllm+start", "evllm-http"):
            if runner not in b:
                continue
            r = b[runner]
            lines.append(
                f"| {runner} | {_f(r['e2e_seconds'].get(small), '{:.1f}')} | {_f(r['e2e_seconds'].get(big), '{:.1f}')} "
                f"| {_f(r['e2e_tok_s_big'], '{:.0f}')} | {_f(r['marginal_lines_s'], '{:.0f}')} "
                f"| {_f(r['marginal_tok_s'], '{:.0f}')} |"
            )
        if "marginal_ratio" in b:
            lines += ["", f"Marginal tok/s ratio evllm / run_batch: **{_f(b['marginal_ratio'])}**; "
                      f"end to end incl. engine start ({big} lines): **{_f(b['e2e_ratio_with_start'])}**."]  # fmt: skip
        if "http_marginal_ratio" in b:
            lines += [
                "",
                f"Marginal tok/s ratio evllm OpenAI Batch API / run_batch: **{_f(b['http_marginal_ratio'])}**.",
            ]
    p = s["priority"]
    if p:
        lines += [
            "",
            f"## Priority (evllm OpenAI completions at concurrency {cfg['priority_concurrency']}, "
            f"batch job of {cfg['priority_lines']} lines)",
            "",
            "| | p50 ms | p95 ms |",
            "|---|---:|---:|",
            f"| idle | {_f(p['p50_idle'] * 1e3, '{:.1f}')} | {_f(p['p95_idle'] * 1e3, '{:.1f}')} |",
            f"| batch job running | {_f(p['p50_batch'] * 1e3, '{:.1f}')} | {_f(p['p95_batch'] * 1e3, '{:.1f}')} |",
            "",
            f"p95 ratio (median of per-repeat ratios): **{_f(p['ratio'])}**; batch job still running "
            f"at the end of every busy window: {'yes' if p['batch_running_throughout'] else '**no**'}.",
        ]
    c = s["cold_start"]
    if c:
        lines += [
            "",
            "## Cold start (process start to ready)",
            "",
            "| vllm serve s | evllm s | ratio |",
            "|---:|---:|---:|",
            f"| {_f(c['vllm'], '{:.1f}')} | {_f(c['evllm'], '{:.1f}')} | {_f(c['ratio'])} |",
        ]
    st = s["startup"]
    if st:
        from predictors.startup import PHASES

        lines += [
            "",
            f"## Cold start by phase (seconds, median of {st['repeats']}; process start to ready)",
            "",
            "fresh: an empty vLLM cache directory; warm: vllm serve's cache as its previous start left it; "
            "prepared: `evllm prepare` built it. Phases are cut at the same vLLM log lines for both servers "
            "(`predictors/startup.py`).",
            "",
            "| server | cache | total | " + " | ".join(PHASES) + " |",
            "|---|---|---:|" + "---:|" * len(PHASES),
        ]
        for row in st["rows"]:
            cells = " | ".join(_f(row["phases"][p], "{:.1f}") for p in PHASES)
            lines.append(f"| {row['server']} | {row['cache']} | {_f(row['seconds'], '{:.1f}')} | {cells} |")
        lines += [
            "",
            f"`evllm prepare`: {_f(st['prepare_seconds'], '{:.1f}')} s. Prepared evllm start / vllm serve "
            f"fresh: **{_f(st['prepared_vs_vllm_fresh'])}** (target <= 0.6); / vllm serve warm: "
            f"**{_f(st['prepared_vs_vllm_warm'])}** (target <= 1.0).",
        ]
    lo = s.get("lora")
    if lo:
        lines += [
            "",
            f"## LoRA (both servers `--enable-lora --max-lora-rank 8 --lora-modules demo-lora=<demo adapter>`; "
            f"OpenAI completions alternating base and adapter, c={lo['concurrency']})",
            "",
            "| server | output tok/s | p50 ms | p95 ms |",
            "|---|---:|---:|---:|",
            *(f"| {name} | {_f(lo[k + '_tok_s'], '{:.0f}')} | {_f(lo[k + '_p50'] * 1e3, '{:.1f}')} | "
              f"{_f(lo[k + '_p95'] * 1e3, '{:.1f}')} |" for k, name in (("vllm", "vllm serve"), ("evllm", "evllm"))),
            "",
            f"evllm / vllm serve throughput (median over evllm windows, each against the vllm serve windows "
            f"beside it): **{_f(lo['ratio'])}** (each window: {' '.join(_f(x) for x in lo['ratios'])}); "
            f"errors: {lo['errors']}.",
        ]  # fmt: skip
    return "\n".join(lines) + "\n"


def plot(results: dict[str, Any], s: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    cs = results["config"]["concurrencies"]
    for key in SERIES:
        rows = [_find(s, LABEL[key], c) for c in cs]
        xs = [c for c, r in zip(cs, rows, strict=True) if r]
        if not xs:
            continue
        ys = [r["tok_s"] for r in rows if r]
        lat = [r["p50"] * 1e3 for r in rows if r]
        axes[0].plot(xs, ys, marker="o", label=LABEL[key])
        axes[1].plot(xs, lat, marker="o", label=LABEL[key])
    for ax, title, ylabel in ((axes[0], "Output throughput", "tok/s"), (axes[1], "p50 latency", "ms")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(cs, [str(c) for c in cs])
        ax.set_xlabel("concurrency")
        ax.set_ylabel(ylabel)
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    names, values = [], []
    for t in s["targets"]:
        if t["value"] is not None:
            names.append(t["target"].replace(" / ", "/\n").replace(", ", "\n"))
            values.append(t["value"] / t["goal"])
    colors = ["tab:green" if t["met"] else "tab:red" for t in s["targets"] if t["value"] is not None]
    axes[2].barh(range(len(values)), values, color=colors)
    axes[2].set_yticks(range(len(values)), names, fontsize=7)
    axes[2].axvline(1.0, color="k", lw=1)
    axes[2].set_title("Targets: measured / goal (green = met)")
    axes[2].invert_yaxis()
    m = results["machine"]
    fig.suptitle(
        f"evllm vs vllm serve — {m['nproc']} cores {m['cpu']}, {m['mem_gib']} GiB, no GPU", fontsize=10
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(results: dict[str, Any], out: Path) -> dict[str, Any]:
    s = summarize(results)
    (out / "results.md").write_text(markdown(results, s))
    try:
        plot(results, s, out / "bench.png")
    except ImportError:  # matplotlib comes with the `bench` extra (make bench); `make test` lacks it
        print("matplotlib is not installed (pip install -e '.[bench]'): no bench.png")
    return s

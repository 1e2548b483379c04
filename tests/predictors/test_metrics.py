"""/metrics: evllm's series move with traffic on every protocol (in-process, exact token counts from the
fake engine), the dashboard only uses names a real server exports (evllm_* and vLLM's vllm:*, checked on
the session server), and the monitoring kustomization builds."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
from pathlib import Path

import httpx
import pytest
import yaml

from eventing.extension import Eventing
from predictors import metrics
from predictors.metrics import protocol_of
from tests import inprocess
from tests.predictors.harness import MODEL_NAME, samples, scrape, sse, total, v2_body
from tests.server import ROOT

MONITORING = ROOT / "inferenceservices" / "monitoring"
DASHBOARD = MONITORING / "evllm-dashboard.json"
# PromQL words that look like metric names but are functions, keywords or label names.
PROMQL_WORDS = {
    "sum", "by", "rate", "histogram_quantile", "max", "clamp_min", "le", "protocol", "code", "reason",
    "outcome", "model", "model_name", "pod", "label_values", "without", "avg", "min", "count", "irate",
    "phase", "inferenceservice", "configuration_name", "count_over_time", "clamp_max", "offset",
}  # fmt: skip
SERIES = MONITORING / "series"  # third-party series names, vendored from their documentation (SOURCES.md)


def third_party_series() -> dict[str, set[str]]:
    """Each vendored list: the series names it documents (one per line, # comments)."""
    lists = {}
    for path in sorted(SERIES.glob("*.txt")):
        lines = (line.strip() for line in path.read_text().splitlines())
        lists[path.stem] = {line for line in lines if line and not line.startswith("#")}
    return lists


def documented() -> set[str]:
    return set().union(*third_party_series().values())


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    names = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
        expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
        expr = re.sub(r'"[^"]*"', "", expr)
        expr = re.sub(r"\b\d+[smhdwy]\b", "", expr)  # durations (offset 1m)
        expr = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "", expr)  # numbers such as 1e-9
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
            if word not in PROMQL_WORDS:
                names.add(word)
    return names


def test_protocol_labels_are_bounded():
    metrics.init(MODEL_NAME, 1, {"/events": "events"})
    try:
        assert protocol_of("POST", "/v2/models/x/infer") == "v2"
        assert protocol_of("POST", "/v2/models/x/generate") == "generate"
        assert protocol_of("POST", "/v2/models/x/versions/3/generate_stream") == "generate_stream"
        assert protocol_of("POST", "/v1/models/x:predict") == "v1"
        assert protocol_of("POST", "/openai/v1/chat/completions") == "openai"
        assert protocol_of("POST", "/events") == "events"  # an extension's path, its own label
        assert protocol_of("GET", "/v2/models/anything-at-all") == "other"
        assert protocol_of("POST", "/v1/models/x:explain") == "other"
        assert protocol_of("POST", "/events/x") == "other"
        metrics.init(MODEL_NAME, 1)
        assert protocol_of("POST", "/events") == "other"  # unknown without the extension
    finally:
        metrics.init(MODEL_NAME, 1)


def test_dashboard_queries_parse_to_known_names():
    names = dashboard_metric_names()
    assert {
        "evllm_request_duration_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "evllm_batch_lines_total",
        "evllm_startup_seconds",
        "DCGM_FI_DEV_GPU_UTIL",
        "DCGM_FI_DEV_FB_USED",
        "autoscaler_actual_pods",
        "activator_request_concurrency",
    } <= names
    # Every name that is not evllm's or vLLM's comes from a vendored list, and each list is in use.
    lists = third_party_series()
    assert set(lists) == {"dcgm-exporter", "knative-serving"}
    foreign = {n for n in names if not n.startswith(("evllm_", "vllm:"))}
    assert foreign <= documented(), sorted(foreign - documented())
    assert all(foreign & listed for listed in lists.values())
    sources = (SERIES / "SOURCES.md").read_text()
    for name in lists:
        assert re.search(rf"`{name}\.txt`: repo \S+, path \S+,\s+commit\s+[0-9a-f]{{40}}", sources), name
    # P50/P95/P99 come from histogram buckets.
    text = DASHBOARD.read_text()
    for q in ("0.5", "0.95", "0.99"):
        assert (
            f"histogram_quantile({q}, sum by (le, protocol) (rate(evllm_request_duration_seconds_bucket"
            in text
        )


def test_monitoring_kustomization_builds():
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl must be on PATH"
    out = subprocess.run([kubectl, "kustomize", str(MONITORING)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    objs = {o["kind"]: o for o in yaml.safe_load_all(out.stdout)}
    assert set(objs) == {"PodMonitor", "ConfigMap"}
    endpoint = objs["PodMonitor"]["spec"]["podMetricsEndpoints"][0]
    assert endpoint["path"] == "/metrics" and endpoint["port"] == "user-port"
    cm = objs["ConfigMap"]
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert json.loads(cm["data"]["evllm-dashboard.json"])["uid"] == "evllm-inference"


def test_series_exist_at_zero_before_the_first_request(tmp_path: Path):
    async def main() -> None:
        argv = ["--storage_roots", str(tmp_path), "--max_concurrent_requests", "7"]
        async with inprocess.server(argv, extensions=[Eventing()]) as s, s.client() as c:
            now = await scrape(c)
            assert now[f'evllm_admission_limit{{model="{MODEL_NAME}"}}'] == 7
            assert now[f'evllm_draining{{model="{MODEL_NAME}"}}'] == 0
            for proto in (*metrics.PROTOCOLS, "events", "batch"):
                assert f'evllm_requests_in_flight{{model="{MODEL_NAME}",protocol="{proto}"}}' in now, proto
            for reason in metrics.REJECT_REASONS:
                assert f'evllm_requests_rejected_total{{model="{MODEL_NAME}",reason="{reason}"}}' in now, (
                    reason
                )
            # Every evllm_* name the dashboard queries exists before any traffic (vllm:* and the start's
            # phases come with the engine's start; evllm_requests_total with the first answer, whose status
            # code is its label; third-party names are checked against their vendored lists).
            exported = {k.split("{")[0] for k in now} | {"evllm_requests_total"} | documented()
            with_engine = ("vllm:", "evllm_startup_seconds")
            missing = sorted(n for n in dashboard_metric_names() - exported if not n.startswith(with_engine))
            assert not missing, f"dashboard uses metrics the server does not export: {missing}"
            assert s.engine.fake.requests == []

    asyncio.run(main())


def test_metrics_move_on_every_protocol(tmp_path: Path):
    async def main() -> None:
        argv = ["--storage_roots", str(tmp_path)]
        async with inprocess.server(argv, extensions=[Eventing()]) as s, s.client() as c:
            before = await scrape(c)
            params = {"max_tokens": 4, "temperature": 0}
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["Hello", "World"], params))
            assert r.status_code == 200
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "Hello", "parameters": params}
            )
            assert r.status_code == 200
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/generate_stream", json={"text_input": "Hello", "parameters": params}
            )
            assert r.status_code == 200 and len(sse(r.text)) == 4
            r = await c.post(
                f"/v1/models/{MODEL_NAME}:predict", json={"instances": ["Hello"], "parameters": params}
            )
            assert r.status_code == 200
            r = await c.post("/openai/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello"})
            assert r.status_code == 200
            r = await c.post(
                "/events",
                json={"text_input": "Hi", "parameters": params},
                headers={
                    "ce-specversion": "1.0",
                    "ce-id": "m-1",
                    "ce-source": "/t",
                    "ce-type": "dev.evllm.inference.request",
                },
            )
            assert r.status_code == 200, r.text
            assert (
                await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": 5})
            ).status_code == 422
            assert (
                await c.post("/v2/models/no-such-model-4711/infer", json=v2_body(["a"]))
            ).status_code == 404
            after = await scrape(c)

        # Labels come from the served model and a fixed protocol set, never from the URL (bounded series).
        assert not any("no-such-model-4711" in k for k in after)

        def moved(name: str, **labels: str) -> float:
            return total(after, name, **labels) - total(before, name, **labels)

        for proto in ("v2", "generate", "generate_stream", "v1", "openai", "events"):
            assert moved("evllm_requests_total", protocol=proto, code="200") == 1, proto
            assert moved("evllm_request_duration_seconds_count", protocol=proto) >= 1, proto
        # One token per character: exact counts.
        expected = {
            "v2": (10, 8),
            "generate": (5, 4),
            "generate_stream": (5, 4),
            "v1": (5, 4),
            "events": (2, 2),
        }
        for proto, (prompt, completion) in expected.items():
            assert moved("evllm_prompt_tokens_total", protocol=proto) == prompt, proto
            assert moved("evllm_completion_tokens_total", protocol=proto) == completion, proto
        assert moved("evllm_requests_total", protocol="generate", code="422") == 1
        assert moved("evllm_requests_total", protocol="v2", code="404") == 1
        # Streamed generations only: the first token, then one gap per further token.
        assert moved("evllm_time_to_first_token_seconds_count", protocol="generate_stream") == 1
        assert moved("evllm_inter_token_latency_seconds_count", protocol="generate_stream") == 3
        assert moved("evllm_time_to_first_token_seconds_count", protocol="generate") == 0
        for proto in expected:
            assert total(after, "evllm_requests_in_flight", protocol=proto) == 0

    asyncio.run(main())


@pytest.mark.slow
def test_openai_tokens_and_every_dashboard_name_on_the_real_server(server):
    """vLLM's OpenAI layer submits through the instrumented AsyncLLM too; vllm:* names come from it."""
    url = server.url
    before = samples(httpx.get(url + "/metrics", timeout=30).text)
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "stream": True, "ignore_eos": True}
    with httpx.stream("POST", f"{url}/openai/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and any("[DONE]" in line for line in r.iter_lines())
    chat = {
        "model": MODEL_NAME,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 3,
        "ignore_eos": True,
    }
    r = httpx.post(f"{url}/openai/v1/chat/completions", json=chat, timeout=60)
    assert r.status_code == 200, r.text
    after = samples(httpx.get(url + "/metrics", timeout=30).text)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    assert moved("evllm_requests_total", protocol="openai", code="200") == 2
    assert moved("evllm_completion_tokens_total", protocol="openai") == 7
    assert moved("evllm_prompt_tokens_total", protocol="openai") >= 7
    assert moved("evllm_time_to_first_token_seconds_count", protocol="openai") == 1
    assert moved("evllm_inter_token_latency_seconds_count", protocol="openai") == 3
    assert moved("vllm:generation_tokens_total") >= 7
    # Every name the dashboard queries is exported by this real server.
    exported = {k.split("{")[0] for k in after}
    missing = sorted(dashboard_metric_names() - exported - documented())
    assert not missing, f"dashboard uses metrics the server does not export: {missing}"

"""/metrics: evllm's series move with real traffic on every protocol, and the dashboard only uses names a
real server exports (evllm_* and vLLM's vllm:*). The monitoring kustomization builds."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import httpx
import pytest
import yaml

from predictors.metrics import protocol_of
from tests.conftest import MODEL_NAME
from tests.server import ROOT

MONITORING = ROOT / "inferenceservices" / "monitoring"
DASHBOARD = MONITORING / "evllm-dashboard.json"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (\S+)$")
# PromQL words that look like metric names but are functions, keywords or label names.
PROMQL_WORDS = {
    "sum", "by", "rate", "histogram_quantile", "max", "clamp_min", "le", "protocol", "code", "reason",
    "outcome", "model", "model_name", "pod", "label_values", "without", "avg", "min", "count", "irate",
}  # fmt: skip


def scrape(url: str) -> dict[str, float]:
    """name{labels} -> value, summed over nothing: every sample as exported."""
    out = {}
    for line in httpx.get(url + "/metrics", timeout=30).text.splitlines():
        m = SAMPLE.match(line)
        if m:
            out[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return out


def total(samples: dict[str, float], name: str, **labels: str) -> float:
    want = [f'{k}="{v}"' for k, v in labels.items()]
    return sum(v for k, v in samples.items() if k.split("{")[0] == name and all(w in k for w in want))


def dashboard_metric_names() -> set[str]:
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    exprs += [v["query"]["query"] for v in dash["templating"]["list"] if isinstance(v.get("query"), dict)]
    names = set()
    for expr in exprs:
        expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
        expr = re.sub(r"\[[^\]]*\]", "", expr)  # range selectors
        expr = re.sub(r'"[^"]*"', "", expr)
        expr = re.sub(r"\b\d+(\.\d+)?(e-?\d+)?\b", "", expr)  # numbers such as 1e-9
        for word in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
            if word not in PROMQL_WORDS:
                names.add(word)
    return names


def test_protocol_labels_are_bounded():
    assert protocol_of("POST", "/v2/models/x/infer") == "v2"
    assert protocol_of("POST", "/v2/models/x/versions/3/generate_stream") == "generate_stream"
    assert protocol_of("POST", "/v1/models/x:predict") == "v1"
    assert protocol_of("POST", "/openai/v1/chat/completions") == "openai"
    assert protocol_of("POST", "/events") == "events"
    assert protocol_of("GET", "/v2/models/anything-at-all") == "other"


def test_dashboard_queries_parse_to_known_names():
    names = dashboard_metric_names()
    assert {
        "evllm_request_duration_seconds_bucket",
        "vllm:kv_cache_usage_perc",
        "evllm_batch_lines_total",
    } <= names
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


@pytest.mark.slow
def test_metrics_move_and_every_dashboard_name_is_exported(server):
    url = server.url
    before = scrape(url)
    params = {"max_tokens": 4, "temperature": 0}
    v2 = {
        "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [2], "data": ["Hello", "World"]}],
        "parameters": params,
    }
    assert httpx.post(f"{url}/v2/models/{MODEL_NAME}/infer", json=v2, timeout=60).status_code == 200
    assert (
        httpx.post(
            f"{url}/v2/models/{MODEL_NAME}/generate",
            json={"text_input": "Hello", "parameters": params},
            timeout=60,
        ).status_code
        == 200
    )
    with httpx.stream(
        "POST",
        f"{url}/v2/models/{MODEL_NAME}/generate_stream",
        json={"text_input": "Hello", "parameters": params},
        timeout=60,
    ) as r:
        assert r.status_code == 200 and sum(1 for line in r.iter_lines() if line.startswith("data:")) >= 1
    assert (
        httpx.post(
            f"{url}/v1/models/{MODEL_NAME}:predict",
            json={"instances": ["Hello"], "parameters": params},
            timeout=60,
        ).status_code
        == 200
    )
    body = {"model": MODEL_NAME, "prompt": "Hello", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{url}/openai/v1/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and any("[DONE]" in line for line in r.iter_lines())
    assert (
        httpx.post(f"{url}/v2/models/{MODEL_NAME}/generate", json={"text_input": 5}, timeout=60).status_code
        == 422
    )
    assert httpx.post(f"{url}/v2/models/no-such-model-4711/infer", json=v2, timeout=60).status_code == 404
    after = scrape(url)
    # Labels come from the served model and a fixed protocol set, never from the URL (bounded series).
    assert not any("no-such-model-4711" in k for k in after)

    def moved(name: str, **labels: str) -> float:
        return total(after, name, **labels) - total(before, name, **labels)

    for proto in ("v2", "generate", "generate_stream", "v1", "openai"):
        assert moved("evllm_requests_total", protocol=proto, code="200") >= 1, proto
        assert moved("evllm_request_duration_seconds_count", protocol=proto) >= 1, proto
        assert moved("evllm_prompt_tokens_total", protocol=proto) >= 1, proto
        assert moved("evllm_completion_tokens_total", protocol=proto) >= 4, proto
    assert moved("evllm_completion_tokens_total", protocol="v2") == 8  # two prompts x 4 tokens
    assert moved("evllm_requests_total", protocol="generate", code="422") == 1
    for proto in ("generate_stream", "openai"):
        assert moved("evllm_time_to_first_token_seconds_count", protocol=proto) == 1, proto
        assert moved("evllm_inter_token_latency_seconds_count", protocol=proto) >= 2, proto
    assert moved("vllm:generation_tokens_total") >= 24
    assert total(after, "evllm_requests_in_flight", protocol="v2") == 0
    # Every name the dashboard queries is exported by this real server.
    exported = {k.split("{")[0] for k in after}
    missing = sorted(dashboard_metric_names() - exported)
    assert not missing, f"dashboard uses metrics the server does not export: {missing}"

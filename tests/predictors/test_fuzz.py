"""Fuzzing the hardened server: schemathesis over its OpenAPI schema (OpenAI sub-app included), plus
hypothesis-made malformed V2 infer bodies and CloudEvents. >= 1000 requests in all; no 5xx, ever, and the
server is still live and ready at the end."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode

from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.slow

SCHEMA_CASES = 300  # per generation mode (positive, negative)
V2_CASES = 250
EVENT_CASES = 250
SETTINGS = dict(
    deadline=None,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _no_5xx(r: httpx.Response | Any, what: Any) -> None:
    assert r.status_code < 500, f"{r.status_code} for {what!r}: {r.text[:500]}"


def _alive(url: str) -> None:
    assert httpx.get(url + "/v2/health/live", timeout=30).status_code == 200
    assert httpx.get(url + "/v2/health/ready", timeout=30).status_code == 200


@pytest.fixture(scope="module")
def client(hardened):
    with httpx.Client(base_url=hardened.url, headers=hardened.headers, timeout=120) as c:
        yield c


def test_schemathesis_over_the_openapi_schema(hardened, client):
    raw = client.get("/openapi.json").json()
    assert "/openai/v1/chat/completions" in raw["paths"] and "/v2/models/{model_name}/infer" in raw["paths"]
    schema = schemathesis.openapi.from_dict(raw)
    calls = {"n": 0}
    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        strategy = schema.as_strategy(generation_mode=mode)

        @settings(max_examples=SCHEMA_CASES, **SETTINGS)
        @given(case=strategy)
        def run(case: Any) -> None:
            # Point generated model names at the served model half the time, so cases get past the 404.
            if case.path_parameters and "model_name" in case.path_parameters and calls["n"] % 2 == 0:
                case.path_parameters["model_name"] = MODEL_NAME
            calls["n"] += 1
            response = case.call(base_url=hardened.url, headers=hardened.headers, timeout=120)
            _no_5xx(response, (case.method, case.formatted_path, case.body))

        run()
    assert calls["n"] >= SCHEMA_CASES
    _alive(hardened.url)


v2_tensor = st.fixed_dictionaries(
    {},
    optional={
        "name": st.sampled_from(["text_input", "input", ""]) | st.text(max_size=8),
        "datatype": st.sampled_from(["BYTES", "INT32", "FP32", "BOOL", "bytes"]) | st.text(max_size=5),
        "shape": st.lists(st.integers(-3, 5), max_size=3) | json_value,
        "data": st.lists(st.text(max_size=12) | st.integers() | json_value, max_size=5) | json_value,
        "parameters": st.dictionaries(st.text(max_size=10), json_leaf, max_size=3) | json_value,
    },
)
v2_body = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "id": st.text(max_size=10) | json_leaf,
            "inputs": st.lists(v2_tensor, max_size=3) | json_value,
            "outputs": st.lists(st.fixed_dictionaries({"name": st.text(max_size=12)}), max_size=2)
            | json_value,
            "parameters": st.fixed_dictionaries(
                {},
                optional={
                    "max_tokens": st.integers(-5, 400) | json_leaf,
                    "temperature": st.floats(-1, 3) | json_leaf,
                    "top_p": st.floats(-1, 2) | json_leaf,
                    "stop": st.lists(st.text(max_size=4), max_size=2) | json_leaf,
                    "seed": st.integers(-(2**70), 2**70),
                },
            )
            | json_value,
        },
    ),
    json_value,
)


def test_malformed_v2_infer_bodies(hardened, client):
    @settings(max_examples=V2_CASES, **SETTINGS)
    @given(body=v2_body, raw=st.booleans(), binary=st.booleans())
    def run(body: Any, raw: bool, binary: bool) -> None:
        content = json.dumps(body).encode()
        headers = {"content-type": "application/json"}
        if raw:
            content = content[: len(content) // 2]  # truncated JSON
        if binary:
            headers["inference-header-content-length"] = str(max(len(content) - 3, 0))
        r = client.post(f"/v2/models/{MODEL_NAME}/infer", content=content, headers=headers)
        _no_5xx(r, content)
        if r.status_code >= 400:
            assert isinstance(r.json()["error"], str)

    run()
    _alive(hardened.url)


TYPES = ["dev.evllm.inference.request", "dev.evllm.batch.submitted", "dev.evllm.batch.chunk", "other.type"]
attributes = st.fixed_dictionaries(
    {},
    optional={
        "specversion": st.sampled_from(["1.0", "0.3", ""]) | json_leaf,
        "id": st.text(max_size=12) | json_leaf,
        "source": st.sampled_from(["/fuzz", "urn:x", ""]) | json_leaf,
        "type": st.sampled_from(TYPES) | json_leaf,
        "time": st.sampled_from(["2024-01-01T00:00:00Z", "lunchtime", "2024-13-40T99:00:00Z"]) | json_leaf,
        "datacontenttype": st.sampled_from(["application/json", "text/plain", "bad"]) | json_leaf,
        "subject": json_leaf,
        "model": st.sampled_from([MODEL_NAME, "other"]) | json_leaf,
        "MyExt": json_leaf,
    },
)
event_data = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "text_input": st.text(max_size=20) | json_leaf,
            "messages": st.lists(
                st.fixed_dictionaries({"role": st.sampled_from(["user", "x"]), "content": json_leaf}),
                max_size=2,
            )
            | json_value,
            "parameters": st.fixed_dictionaries({}, optional={"max_tokens": st.integers(-2, 300) | json_leaf})
            | json_value,
            "job_id": st.text(max_size=8) | json_leaf,
            "input": st.lists(json_value, max_size=3) | json_leaf,
            "output": st.sampled_from(["../../etc", "/tmp", "s3://x/y", ""]) | json_leaf,
            "chunk": st.integers(-1, 5) | json_leaf,
            "chunks": st.integers(-1, 5) | json_leaf,
        },
    ),
    json_value,
)


def test_malformed_cloudevents(hardened, client):
    @settings(max_examples=EVENT_CASES, **SETTINGS)
    @given(attrs=attributes, data=event_data, binary=st.booleans(), data_base64=st.booleans())
    def run(attrs: dict[str, Any], data: Any, binary: bool, data_base64: bool) -> None:
        if binary:
            headers = {f"ce-{k.lower()}": str(v) for k, v in attrs.items() if v is not None}
            headers = {k: v for k, v in headers.items() if v.isprintable() and v.isascii()}
            headers["content-type"] = "application/json"
            r = client.post("/events", content=json.dumps(data).encode(), headers=headers)
        else:
            obj = {**attrs, ("data_base64" if data_base64 else "data"): data}
            r = client.post(
                "/events",
                content=json.dumps(obj).encode(),
                headers={"content-type": "application/cloudevents+json"},
            )
        _no_5xx(r, (attrs, data))
        if r.status_code >= 400 and r.status_code != 429:
            assert isinstance(r.json()["error"], str)

    run()
    _alive(hardened.url)

"""Fuzzing: schemathesis over the server's OpenAPI schema, hypothesis-made malformed V2 infer bodies and
CloudEvents. No 5xx, ever; every error is JSON; the server is still live and ready at the end.

In-process (auth, tight limits, eventing; over the fake engine) for everything evllm and KServe answer:
> 1500 requests in a few seconds. vLLM's own OpenAI validation is fuzzed on the session server (slow).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from eventing.extension import Eventing
from tests.predictors.harness import (
    MODEL_NAME,
    Blocking,
    blocking,
    sse,
)

API_KEY = "fuzz-key-0123456789"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CASES_PER_OPERATION = 40  # per operation and generation mode (positive, negative) that can vary
V2_CASES = 400
GENERATE_CASES = 300
EVENT_CASES = 400
OPENAI_CASES = 10  # per operation and generation mode on the real server: ~60 in all (4 operations)
SETTINGS: dict[str, Any] = dict(
    deadline=None,
    database=None,
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)
# The same tight limits the hardened server had: refusals are part of what is fuzzed.
ARGV = [
    "--max_concurrent_requests", "2",
    "--max_prompts_per_request", "3",
    "--max_prompt_tokens", "48",
    "--max_tokens_limit", "32",
    "--max_request_bytes", str(32 * 1024),
    "--max_event_bytes", str(64 * 1024),
    "--max_batch_lines", "5",
]  # fmt: skip

json_leaf = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**40), 2**40), st.floats(allow_nan=False), st.text(max_size=20)
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=12,
)


def _json_error(r: httpx.Response, what: Any) -> None:
    """Below 500, and an error is JSON with a message: {"error": "..."} (evllm's and KServe's shape)."""
    assert r.status_code < 500, f"{r.status_code} for {what!r}: {r.text[:500]}"
    if r.status_code >= 400:
        assert isinstance(r.json().get("error"), str), (r.status_code, r.text[:500], what)


def _alive(b: Blocking) -> None:
    assert b.get("/v2/health/live").status_code == 200
    assert b.get("/v2/health/ready").status_code == 200
    assert b.server.admission.in_flight == 0 and b.server.dataplane.online_load == 0


@pytest.fixture(scope="module")
def fuzzed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Blocking]:
    storage = tmp_path_factory.mktemp("fuzz-storage")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("EVLLM_API_KEYS", API_KEY)
        with blocking([*ARGV, "--storage_roots", str(storage)], extensions=[Eventing()], headers=AUTH) as b:
            yield b


def _send(b: Blocking, kwargs: dict[str, Any]) -> httpx.Response:
    """A schemathesis case (requests-style keyword arguments) sent through the in-process client."""
    assert not kwargs.get("cookies")
    request: dict[str, Any] = {
        "params": kwargs.get("params"),
        "headers": {**AUTH, **(kwargs.get("headers") or {})},
    }
    if "json" in kwargs:
        request["json"] = kwargs["json"]
    elif isinstance(kwargs.get("data"), (bytes, str)):
        request["content"] = kwargs["data"]
    elif kwargs.get("data") is not None:
        request["data"] = kwargs["data"]
    return b.request(kwargs["method"], kwargs["url"], **request)


def _fuzz(operations: list[Any], examples: int, handle: Callable[[Any, GenerationMode], None]) -> None:
    """`handle(case, mode)` for up to `examples` schemathesis cases per operation and generation mode."""
    for operation in operations:
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            _fuzz_operation(operation, mode, examples, handle)


def _fuzz_operation(
    operation: Any, mode: GenerationMode, examples: int, handle: Callable[[Any, GenerationMode], None]
) -> None:
    @settings(max_examples=examples, **SETTINGS)
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: Any) -> None:
        handle(case, mode)

    try:
        run()
    except Unsatisfiable:
        # Nothing can be invalid: no body and no constrained parameter (GET /v2/health/live, ...).
        assert mode == GenerationMode.NEGATIVE


def test_schemathesis_over_the_openapi_schema(fuzzed: Blocking):
    raw = fuzzed.get("/openapi.json").json()
    assert "/openai/v1/chat/completions" in raw["paths"] and "/v2/models/{model_name}/infer" in raw["paths"]
    # The in-process OpenAI sub-app is a stand-in: vLLM's is fuzzed on the real server below.
    schema = schemathesis.openapi.from_dict(raw).exclude(path_regex="^/openai/")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    calls: dict[str, int] = {}
    negative: set[str] = set()

    def handle(case: Any, mode: GenerationMode) -> None:
        n = calls[case.path] = calls.get(case.path, 0) + 1
        if mode == GenerationMode.NEGATIVE:
            negative.add(case.path)
        # Point generated model names at the served model half the time, so cases get past the 404.
        if case.path_parameters and "model_name" in case.path_parameters and n % 2 == 0:
            case.path_parameters["model_name"] = MODEL_NAME
        r = _send(fuzzed, case.as_transport_kwargs(base_url="http://predictor"))
        _json_error(r, (case.method, case.formatted_path, case.body))

    _fuzz(operations, CASES_PER_OPERATION, handle)
    assert sum(calls.values()) >= 500, calls
    assert "/v2/models/{model_name}/infer" in negative and len(negative) >= 3, negative
    _alive(fuzzed)


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


def test_malformed_v2_infer_bodies(fuzzed: Blocking):
    statuses: set[int] = set()

    @settings(max_examples=V2_CASES, **SETTINGS)
    @given(
        body=v2_body, raw=st.booleans(), binary=st.booleans(), typed=st.booleans(), split=st.integers(0, 80)
    )
    def run(body: Any, raw: bool, binary: bool, typed: bool, split: int) -> None:
        content = json.dumps(body).encode()
        headers = {"content-type": "application/json"} if typed else {}
        if raw:
            content = content[: len(content) // 2]  # truncated JSON
        if binary:
            # A binary-tensor request whose JSON header ends anywhere: cut short, whole (JSON that need not be
            # an infer request, and no tensor bytes after it) or claiming more than was sent.
            headers["inference-header-content-length"] = str(split)
        r = fuzzed.post(f"/v2/models/{MODEL_NAME}/infer", content=content, headers=headers)
        _json_error(r, content)
        statuses.add(r.status_code)

    run()
    assert 400 in statuses
    _alive(fuzzed)


generate_body = st.one_of(
    st.fixed_dictionaries(  # well-formed, with parameters anywhere in (and past) their ranges
        {"text_input": st.text(min_size=1, max_size=30)},
        optional={"parameters": st.fixed_dictionaries({"max_tokens": st.integers(-2, 40)})},
    ),
    st.fixed_dictionaries(
        {},
        optional={
            "text_input": st.text(max_size=40) | json_leaf,
            "id": json_leaf,
            "parameters": st.fixed_dictionaries(
                {},
                optional={
                    "max_tokens": st.integers(-5, 100) | json_leaf,
                    "temperature": st.floats(-1, 3) | json_leaf,
                    "stop": st.lists(st.text(max_size=4), max_size=2) | json_leaf,
                    "details": json_leaf,
                    "ignore_eos": json_leaf,
                },
            )
            | st.dictionaries(st.text(max_size=10), json_leaf, max_size=3)
            | json_value,
            "prompt": json_leaf,
        },
    ),
    json_value,
)


def test_malformed_generate_bodies(fuzzed: Blocking):
    statuses: set[int] = set()

    @settings(max_examples=GENERATE_CASES, **SETTINGS)
    @given(body=generate_body, path=st.sampled_from(["generate", "generate_stream"]), raw=st.booleans())
    def run(body: Any, path: str, raw: bool) -> None:
        content = json.dumps(body).encode()
        if raw:
            content = content[: len(content) // 2]
        r = fuzzed.post(f"/v2/models/{MODEL_NAME}/{path}", content=content)
        _json_error(r, content)
        statuses.add(r.status_code)
        if r.status_code == 200 and path == "generate_stream":
            events = sse(r.text)
            assert events and events[-1].get("finish_reason") in ("length", "eos_token", "stop_sequence")

    run()
    assert {200, 422} <= statuses
    _alive(fuzzed)


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


def test_malformed_cloudevents(fuzzed: Blocking, tmp_path: Path):
    statuses: set[int] = set()

    @settings(max_examples=EVENT_CASES, **SETTINGS)
    @given(attrs=attributes, data=event_data, binary=st.booleans(), data_base64=st.booleans())
    def run(attrs: dict[str, Any], data: Any, binary: bool, data_base64: bool) -> None:
        if binary:
            headers = {f"ce-{k.lower()}": str(v) for k, v in attrs.items() if v is not None}
            headers = {k: v for k, v in headers.items() if v.isprintable() and v.isascii()}
            headers["content-type"] = "application/json"
            r = fuzzed.post("/events", content=json.dumps(data).encode(), headers=headers)
        else:
            obj = {**attrs, ("data_base64" if data_base64 else "data"): data}
            r = fuzzed.post(
                "/events",
                content=json.dumps(obj).encode(),
                headers={"content-type": "application/cloudevents+json"},
            )
        _json_error(r, (attrs, data))
        statuses.add(r.status_code)

    run()
    assert 400 in statuses
    _alive(fuzzed)


# vLLM's OpenAI layer on the real engine -----------------------------------------------------------------
@pytest.mark.slow
def test_schemathesis_over_the_real_openai_paths(server):
    raw = httpx.get(server.url + "/openapi.json", timeout=30).json()
    schema = schemathesis.openapi.from_dict(raw).include(path_regex="^/openai/")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} >= {"/openai/v1/completions", "/openai/v1/chat/completions"}
    calls = {"n": 0}
    with httpx.Client(base_url=server.url, timeout=120) as client:

        def handle(case: Any, mode: GenerationMode) -> None:
            calls["n"] += 1
            kwargs = case.as_transport_kwargs(base_url=server.url)
            body = kwargs.get("json")
            if mode == GenerationMode.POSITIVE and isinstance(body, dict):
                # Generations stay short: the engine is shared with the rest of the session.
                body["max_tokens"] = 2
                for key in ("max_completion_tokens", "min_tokens"):
                    body.pop(key, None)
                for key in ("n", "best_of"):
                    if isinstance(body.get(key), int):
                        body[key] = min(body[key], 2)
            data = kwargs.get("data")
            r = client.request(
                kwargs["method"],
                kwargs["url"],
                params=kwargs.get("params"),
                headers=kwargs.get("headers"),
                json=body if "json" in kwargs else None,
                content=data if "json" not in kwargs and isinstance(data, (bytes, str)) else None,
            )
            assert r.status_code < 500, f"{r.status_code} for {case.body!r}: {r.text[:500]}"

        _fuzz(operations, OPENAI_CASES, handle)
    assert calls["n"] >= 4 * OPENAI_CASES  # every operation reached, in both modes
    assert httpx.get(server.url + "/v2/health/ready", timeout=30).status_code == 200

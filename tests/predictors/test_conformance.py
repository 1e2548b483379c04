"""Conformance to the official Open Inference Protocol specifications (tests/predictors/oip, vendored
unchanged): Schemathesis drives every operation of both spec files, versioned and unversioned paths, and
checks each response against the spec's schema (and that none is a 5xx). Cases Schemathesis cannot make
(valid infer bodies, binary tensors in and out, the JSON inside generate_stream's `data:` events) are
made here and checked against the same schemas.

The spec files write paths `${MODEL_NAME}`-style and only in versioned form; `spec()` rewrites the
placeholders to OpenAPI's `{MODEL_NAME}` and adds each path's unversioned twin (the OIP makes the
version optional in the URL).
"""

from __future__ import annotations

import copy
import json
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import schemathesis
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from predictors.oip import MODEL_VERSION
from tests.inprocess import fake_logprob
from tests.predictors.harness import MODEL_NAME, Blocking, blocking, sse, v2_body

SPECS = Path(__file__).parent / "oip"
CASES = 60  # per operation and generation mode
SETTINGS: dict[str, Any] = dict(
    deadline=None,
    database=None,
    derandomize=True,  # the same cases every run: the floors on 200s and 4xxs below are not left to chance
    phases=[Phase.generate],
    suppress_health_check=list(HealthCheck),
)


def spec(name: str) -> dict[str, Any]:
    raw = yaml.safe_load((SPECS / name).read_text())
    paths: dict[str, Any] = {}
    for path, item in raw["paths"].items():
        path = path.replace("${", "{")
        paths[path] = item
        if "/versions/{MODEL_VERSION}" in path:
            paths[path.replace("/versions/{MODEL_VERSION}", "")] = _without_version(item)
        if path == "/v2/":
            paths["/v2"] = item
    raw["paths"] = paths
    return raw


def _without_version(item: dict[str, Any]) -> dict[str, Any]:
    item = copy.deepcopy(item)
    for holder in [item, *(v for v in item.values() if isinstance(v, dict))]:
        if "parameters" in holder:
            holder["parameters"] = [p for p in holder["parameters"] if p["name"] != "MODEL_VERSION"]
    return item


def validator(raw: dict[str, Any], schema_name: str) -> jsonschema.Validator:
    """A JSON Schema validator for one of the spec's component schemas (refs resolve inside the spec)."""
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": raw["components"]}
    return jsonschema.Draft202012Validator(schema)


@pytest.fixture(scope="module")
def served() -> Iterator[Blocking]:
    with blocking() as b:
        yield b


def _operations(raw: dict[str, Any]) -> list[Any]:
    return [r.ok() for r in schemathesis.openapi.from_dict(raw).get_all_operations()]


def _send(b: Blocking, case: Any) -> Any:
    kwargs = case.as_transport_kwargs(base_url="http://predictor")
    request: dict[str, Any] = {"params": kwargs.get("params"), "headers": kwargs.get("headers")}
    if "json" in kwargs:
        request["json"] = kwargs["json"]
    elif kwargs.get("data") is not None:
        request["content"] = kwargs["data"]
    return b.request(kwargs["method"], kwargs["url"], **request)


def _run(b: Blocking, raw: dict[str, Any], check: Any) -> dict[tuple[str, int], int]:
    """Every operation of `raw`, positive and negative; most cases name the served model and version
    (random names are 404s, which says little). Returns how many responses each (path, status) had."""
    seen: dict[tuple[str, int], int] = {}
    for operation in _operations(raw):
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):

            @settings(max_examples=CASES, **SETTINGS)
            @given(case=operation.as_strategy(generation_mode=mode))
            def one(case: Any) -> None:
                n = sum(v for (p, _), v in seen.items() if p == case.path)
                params = case.path_parameters or {}
                if n % 4 and "MODEL_NAME" in params:
                    params["MODEL_NAME"] = MODEL_NAME
                if n % 4 and "MODEL_VERSION" in params:
                    params["MODEL_VERSION"] = MODEL_VERSION
                r = _send(b, case)
                key = (case.path, r.status_code)
                seen[key] = seen.get(key, 0) + 1
                check(case, r)

            try:
                one()
            except Exception as exc:  # hypothesis: nothing to negate on a GET without parameters
                if type(exc).__name__ != "Unsatisfiable":
                    raise
    return seen


def test_schemathesis_over_the_oip_rest_spec(served: Blocking):
    raw = spec("open_inference_rest.yaml")

    def check(case: Any, r: Any) -> None:
        case.validate_response(r, checks=[not_a_server_error, response_schema_conformance])

    seen = _run(served, raw, check)
    ok = {path for (path, status), _ in seen.items() if status == 200}
    # Health, server metadata, model metadata and readiness answer 200, with and without a version.
    assert ok >= {
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/",
        "/v2",
        "/v2/models/{MODEL_NAME}",
        "/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}",
        "/v2/models/{MODEL_NAME}/ready",
        "/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/ready",
    }, seen


def test_schemathesis_over_the_generate_spec(served: Blocking):
    raw = spec("generate_rest.yaml")
    stream_payload = validator(raw, "GenerateStreamResponse")
    error = validator(raw, "GenerateErrorResponse")

    def check(case: Any, r: Any) -> None:
        if not case.path.endswith("/generate_stream"):
            case.validate_response(r, checks=[not_a_server_error, response_schema_conformance])
            return
        # Schemathesis would check each event's envelope; the spec's schema describes the JSON in `data`.
        case.validate_response(r, checks=[not_a_server_error])
        if r.status_code == 200:
            events = sse(r.text)
            assert events
            for event in events:
                (error if "error" in event else stream_payload).validate(event)
        else:
            error.validate(r.json())

    seen = _run(served, raw, check)
    for path in (
        "/v2/models/{MODEL_NAME}/generate",
        "/v2/models/{MODEL_NAME}/generate_stream",
        "/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/generate",
        "/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/generate_stream",
    ):
        assert seen.get((path, 200), 0) >= 5 and seen.get((path, 422), 0) >= 5, seen


# What Schemathesis cannot make: valid infer requests, binary tensors, details --------------------------
INFER_PATHS = [f"/v2/models/{MODEL_NAME}/infer", f"/v2/models/{MODEL_NAME}/versions/{MODEL_VERSION}/infer"]


@pytest.mark.parametrize("path", INFER_PATHS)
def test_infer_json_conforms(served: Blocking, path: str):
    response = validator(spec("open_inference_rest.yaml"), "inference_response")
    r = served.post(path, json=v2_body(["Hello", "world"], {"max_tokens": 3}))
    assert r.status_code == 200, r.text
    response.validate(r.json())
    assert r.json()["outputs"][0]["data"] == ["HEL", "WOR"]


def _binary_request(prompts: list[str], binary_output: bool) -> tuple[bytes, dict[str, str]]:
    """Triton's binary tensor extension: a JSON header, then each BYTES element length-prefixed."""
    data = b"".join(struct.pack("<I", len(p.encode())) + p.encode() for p in prompts)
    header = {
        "inputs": [
            {
                "name": "text_input",
                "datatype": "BYTES",
                "shape": [len(prompts)],
                "parameters": {"binary_data_size": len(data)},
            }
        ],
        "parameters": {"max_tokens": 2, "binary_data_output": binary_output},
    }
    head = json.dumps(header).encode()
    return head + data, {
        "inference-header-content-length": str(len(head)),
        "content-type": "application/octet-stream",
    }


def test_infer_binary_input_json_output_conforms(served: Blocking):
    response = validator(spec("open_inference_rest.yaml"), "inference_response")
    content, headers = _binary_request(["Hello", "you"], binary_output=False)
    r = served.post(INFER_PATHS[1], content=content, headers=headers)
    assert r.status_code == 200, r.text
    response.validate(r.json())
    assert r.json()["outputs"][0]["data"] == ["HE", "YO"]


def test_infer_binary_output_header_conforms(served: Blocking):
    """With `binary_data_output` the body is a JSON header then the tensors' bytes; the header is the
    spec's inference_response with, per Triton's binary extension, `parameters.binary_data_size` in place
    of each output's `data`."""
    raw = spec("open_inference_rest.yaml")
    relaxed = copy.deepcopy(raw)
    relaxed["components"]["schemas"]["response_output"]["required"].remove("data")
    response = validator(relaxed, "inference_response")
    content, headers = _binary_request(["Hello"], binary_output=True)
    r = served.post(INFER_PATHS[0], content=content, headers=headers)
    assert r.status_code == 200, r.text
    size = int(r.headers["inference-header-content-length"])
    header = json.loads(r.content[:size])
    response.validate(header)
    total = 0
    for output in header["outputs"]:
        assert "data" not in output and output["parameters"]["binary_data_size"] > 0
        total += output["parameters"]["binary_data_size"]
    assert len(r.content) == size + total
    text = r.content[size : size + header["outputs"][0]["parameters"]["binary_data_size"]]
    assert text == struct.pack("<I", 2) + b"HE"


def test_generate_details_conform(served: Blocking):
    raw = spec("generate_rest.yaml")
    body = {"text_input": "Hello", "parameters": {"max_tokens": 3, "details": True}}
    r = served.post(f"/v2/models/{MODEL_NAME}/generate", json=body)
    assert r.status_code == 200, r.text
    validator(raw, "GenerateResponse").validate(r.json())
    r = served.post(f"/v2/models/{MODEL_NAME}/generate_stream", json=body)
    assert r.status_code == 200, r.text
    events = sse(r.text)
    for event in events:
        validator(raw, "GenerateStreamResponse").validate(event)
    assert "details" not in events[0]
    assert events[-1]["details"] == {
        "finish_reason": "length",
        "token": {"id": ord("L"), "text": "L", "logprob": fake_logprob(2), "special": False},
    }

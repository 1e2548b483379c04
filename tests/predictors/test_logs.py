"""Structured logs: JSON lines with request id, CloudEvent id and traceparent; no prompt text at INFO."""

from __future__ import annotations

import json
import logging
import time
import uuid

import httpx
import pytest

from predictors import logs
from tests.conftest import MODEL_NAME

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_json_formatter_carries_the_request_context():
    record = logging.LogRecord("evllm.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.status = 200
    token = logs.CONTEXT.set(logs.RequestContext("req-1", "ce-1", TRACEPARENT))
    try:
        logs.ContextFilter().filter(record)
    finally:
        logs.CONTEXT.reset(token)
    line = json.loads(logs.JSONFormatter().format(record))
    assert line["message"] == "hello world" and line["level"] == "INFO" and line["logger"] == "evllm.test"
    assert line["request_id"] == "req-1" and line["ce_id"] == "ce-1" and line["traceparent"] == TRACEPARENT
    assert line["status"] == 200


def test_identifiers_are_sanitised():
    assert logs.safe_id("abc-123") == "abc-123"
    assert logs.safe_id("bad\nline") is None and logs.safe_id("x" * 200) is None
    assert logs.safe_traceparent(TRACEPARENT) == TRACEPARENT
    assert logs.safe_traceparent("00-zz") is None


def _lines(path) -> list[dict]:
    out = []
    for raw in path.read_text(errors="replace").splitlines():
        if raw.startswith("{"):
            try:
                out.append(json.loads(raw))
            except ValueError:
                continue
    return out


@pytest.mark.slow
def test_access_lines_have_ids_and_no_prompt(hardened):
    secret = f"PROMPT-{uuid.uuid4().hex}"
    rid = f"req-{uuid.uuid4().hex[:12]}"
    r = httpx.post(
        f"{hardened.url}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": secret, "parameters": {"max_tokens": 2}},
        headers={**hardened.headers, "x-request-id": rid, "traceparent": TRACEPARENT},
        timeout=60,
    )
    assert r.status_code == 200 and r.headers["x-request-id"] == rid
    ce_id = f"ce-{uuid.uuid4().hex[:12]}"
    event = {"text_input": secret, "parameters": {"max_tokens": 2}}
    r = httpx.post(
        f"{hardened.url}/events",
        json=event,
        headers={
            **hardened.headers,
            "ce-specversion": "1.0",
            "ce-id": ce_id,
            "ce-source": "/tests/logs",
            "ce-type": "dev.evllm.inference.request",
        },
        timeout=60,
    )
    assert r.status_code == 200, r.text
    generated = r.headers["x-request-id"]
    # Without an X-Request-Id one is made up and returned.
    assert len(generated) == 32
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        lines = _lines(hardened.proc.log_path)
        access = {
            (line.get("request_id"), line.get("path")): line
            for line in lines
            if line.get("logger") == "evllm.access"
        }
        if (rid, f"/v2/models/{MODEL_NAME}/generate") in access and (generated, "/events") in access:
            break
        time.sleep(0.2)
    line = access[(rid, f"/v2/models/{MODEL_NAME}/generate")]
    assert line["status"] == 200 and line["traceparent"] == TRACEPARENT and line["protocol"] == "generate"
    assert line["duration_ms"] > 0 and line["level"] == "INFO"
    ev = access[(generated, "/events")]
    assert ev["ce_id"] == ce_id and ev["protocol"] == "events"
    # The prompt never reaches the log at INFO.
    assert secret not in hardened.proc.log_path.read_text(errors="replace")

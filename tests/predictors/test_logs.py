"""Structured logs: JSON lines with request id, CloudEvent id and traceparent; no prompt text at INFO."""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import logging
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from eventing.extension import Eventing
from predictors import logs
from tests import inprocess
from tests.predictors.harness import MODEL_NAME

TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def test_json_formatter_carries_the_request_context():
    record = logging.LogRecord("evllm.test", logging.INFO, __file__, 1, "hello %s", ("world",), None)
    record.status = 200
    record.detail = {"not": "a scalar"}
    token = logs.CONTEXT.set(logs.RequestContext("req-1", "ce-1", TRACEPARENT))
    try:
        logs.ContextFilter().filter(record)
    finally:
        logs.CONTEXT.reset(token)
    line = json.loads(logs.JSONFormatter().format(record))
    assert line["message"] == "hello world" and line["level"] == "INFO" and line["logger"] == "evllm.test"
    assert line["request_id"] == "req-1" and line["ce_id"] == "ce-1" and line["traceparent"] == TRACEPARENT
    assert line["status"] == 200 and line["detail"] == "{'not': 'a scalar'}"
    assert line["time"].endswith("+00:00")


def test_outside_a_request_no_ids_are_made_up():
    record = logging.LogRecord("evllm.test", logging.WARNING, __file__, 1, "boom", (), None)
    logs.ContextFilter().filter(record)
    line = json.loads(logs.JSONFormatter().format(record))
    assert set(line) == {"time", "level", "logger", "message"}


def test_exceptions_are_one_json_line():
    try:
        raise RuntimeError("kaput")
    except RuntimeError:
        import sys

        record = logging.LogRecord("evllm.test", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    text = logs.JSONFormatter().format(record)
    assert "\n" not in text
    assert "RuntimeError: kaput" in json.loads(text)["exception"]


def test_the_access_record_is_a_whole_log_record():
    # Lighter to build than LogRecord, but every formatter, %-style included, must find what it expects.
    fields = {"status": 200, "path": "/v2/models/m/infer"}
    lean = logs.AccessRecord("%s %s %d", ("POST", fields["path"], 200), fields)
    stock = logging.LogRecord(
        "evllm.access",
        logging.INFO,
        logs.__file__,
        0,
        "%s %s %d",
        ("POST", fields["path"], 200),
        None,
        "access",
    )
    assert set(vars(lean)) == set(vars(stock)) | set(fields)
    for key in set(vars(stock)) - {"created", "msecs", "relativeCreated"}:
        assert getattr(lean, key) == getattr(stock, key), key
    assert abs(lean.created - stock.created) < 1 and abs(lean.relativeCreated - stock.relativeCreated) < 1000
    fmt = logging.Formatter(
        "%(name)s %(levelname)s %(filename)s:%(lineno)d %(funcName)s %(module)s %(process)d"
        " %(processName)s %(threadName)s %(status)s %(message)s"
    )
    assert fmt.format(lean) == fmt.format(logging.makeLogRecord({**vars(stock), **fields}))


def test_json_time_is_iso_8601_utc_to_the_millisecond():
    formatter = logs.JSONFormatter()
    for created in (0.0, 1.2, 1700000000.9999, 1700000000.0005, 1700000000.5004999, 1764932400.123456):
        expected = dt.datetime.fromtimestamp(created, dt.timezone.utc).isoformat(timespec="milliseconds")
        record = logging.makeLogRecord({"created": created, "msg": "x"})
        assert json.loads(formatter.format(record))["time"] == expected, created


def test_identifiers_are_sanitised():
    assert logs.safe_id("abc-123") == "abc-123"
    assert logs.safe_id("bad\nline") is None and logs.safe_id("x" * 200) is None
    assert logs.safe_id(None) is None and logs.safe_id("") is None
    assert logs.safe_traceparent(TRACEPARENT) == TRACEPARENT
    assert logs.safe_traceparent("00-zz") is None
    assert logs.safe_traceparent(TRACEPARENT.upper()) is None


@pytest.fixture
def json_log(caplog: pytest.LogCaptureFixture) -> Iterator[io.StringIO]:
    """evllm's loggers at INFO into a JSON handler set up the way `logs.configure` sets up handlers."""
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logs.JSONFormatter())
    handler.addFilter(logs.ContextFilter())
    logger = logging.getLogger("evllm")
    logger.addHandler(handler)
    caplog.set_level(logging.INFO, logger="evllm")
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_access_lines_have_ids_and_no_prompt(json_log: io.StringIO, tmp_path: Path):
    secret = f"PROMPT-{uuid.uuid4().hex}"
    rid = f"req-{uuid.uuid4().hex[:12]}"
    ce_id = f"ce-{uuid.uuid4().hex[:12]}"

    async def main() -> tuple[str, str]:
        argv = ["--storage_roots", str(tmp_path)]
        async with inprocess.server(argv, extensions=[Eventing()]) as s, s.client() as c:
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/generate",
                json={"text_input": secret, "parameters": {"max_tokens": 2}},
                headers={"x-request-id": rid, "traceparent": TRACEPARENT},
            )
            assert r.status_code == 200 and r.headers["x-request-id"] == rid
            # The engine request is named after the X-Request-Id: logs and engine agree.
            assert s.engine.fake.requests == [f"{rid}-0"]
            r = await c.post(
                "/events",
                json={"text_input": secret, "parameters": {"max_tokens": 2}},
                headers={
                    "ce-specversion": "1.0",
                    "ce-id": ce_id,
                    "ce-source": "/tests/logs",
                    "ce-type": "dev.evllm.inference.request",
                },
            )
            assert r.status_code == 200, r.text
            generated = r.headers["x-request-id"]
            # An unsafe X-Request-Id is replaced, not echoed into logs and headers.
            bad = await c.get("/v2/health/live", headers={"x-request-id": 'evil id"} {"x": 1'})
            replaced = bad.headers["x-request-id"]
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": 5})
            assert r.status_code == 422
            # Probes and scrapes stay out of the access log.
            await c.get("/v2/health/ready")
            await c.get("/metrics")
            return generated, replaced

    generated, replaced = asyncio.run(main())
    # Without an X-Request-Id one is made up and returned.
    assert len(generated) == 32 and int(generated, 16) >= 0
    assert len(replaced) == 32 and "evil" not in replaced
    text = json_log.getvalue()
    lines = [json.loads(raw) for raw in text.splitlines()]
    access = [line for line in lines if line["logger"] == "evllm.access"]
    by_path = {(line.get("request_id"), line["path"]): line for line in access}
    line = by_path[(rid, f"/v2/models/{MODEL_NAME}/generate")]
    assert line["status"] == 200 and line["traceparent"] == TRACEPARENT and line["protocol"] == "generate"
    assert line["method"] == "POST" and line["level"] == "INFO" and line["duration_ms"] >= 0
    assert line["response_bytes"] > 0 and line["message"] == f"POST /v2/models/{MODEL_NAME}/generate 200"
    ev = by_path[(generated, "/events")]
    assert ev["ce_id"] == ce_id and ev["protocol"] == "events" and ev["status"] == 200
    assert any(a["status"] == 422 and a["protocol"] == "generate" for a in access)
    assert not any(a["path"] in ("/v2/health/ready", "/v2/health/live", "/metrics") for a in access)
    # The prompt never reaches the log at INFO.
    assert secret not in text

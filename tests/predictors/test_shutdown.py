"""SIGTERM during streaming: readiness goes false, new work gets 503, every stream in flight finishes
complete, and the process exits 0 within the grace period. Runs last: it stops the hardened server."""

from __future__ import annotations

import json
import signal
import threading
import time

import httpx
import pytest

from tests.conftest import MODEL_NAME
from tests.predictors.conftest import ADMISSION_LIMIT, GRACE_PERIOD

pytestmark = [pytest.mark.slow, pytest.mark.kills_engine]
MAX_TOKENS = 200


def _stream(url: str, headers: dict[str, str], started: threading.Event, result: dict) -> None:
    body = {"text_input": "Once upon a time", "parameters": {"max_tokens": MAX_TOKENS, "ignore_eos": True}}
    try:
        with httpx.stream("POST", url, json=body, headers=headers, timeout=120) as r:
            result["status"] = r.status_code
            chunks = []
            for line in r.iter_lines():
                if line.startswith("data: "):
                    chunks.append(json.loads(line[6:]))
                    started.set()
            result["chunks"] = chunks
    except httpx.HTTPError as exc:
        result["error"] = repr(exc)
    finally:
        started.set()


def test_sigterm_finishes_streams_refuses_new_work_and_exits_0(hardened):
    url = f"{hardened.url}/v2/models/{MODEL_NAME}/generate_stream"
    results = [{} for _ in range(ADMISSION_LIMIT)]
    started = [threading.Event() for _ in range(ADMISSION_LIMIT)]
    threads = [
        threading.Thread(target=_stream, args=(url, hardened.headers, started[i], results[i]))
        for i in range(ADMISSION_LIMIT)
    ]
    for t in threads:
        t.start()
    for s in started:
        assert s.wait(60)
    sent = time.monotonic()
    hardened.proc.proc.send_signal(signal.SIGTERM)
    # Draining: not ready, new work refused with a JSON 503 (retried elsewhere), liveness still fine.
    deadline = time.monotonic() + 5
    while httpx.get(hardened.url + "/v2/health/ready", timeout=10).status_code != 503:
        assert time.monotonic() < deadline, "readiness still true after SIGTERM"
        time.sleep(0.05)
    r = httpx.post(
        f"{hardened.url}/v2/models/{MODEL_NAME}/generate",
        json={"text_input": "late", "parameters": {"max_tokens": 2}},
        headers=hardened.headers,
        timeout=10,
    )
    assert r.status_code == 503 and "shutting down" in r.json()["error"]
    assert httpx.get(hardened.url + "/v2/health/live", timeout=10).status_code == 200
    assert 'evllm_draining{model="demo"} 1.0' in httpx.get(hardened.url + "/metrics", timeout=10).text
    for t in threads:
        t.join(GRACE_PERIOD + 30)
    # None of the streams in flight was lost or cut short.
    for res in results:
        assert res.get("status") == 200 and "error" not in res, res
        last = res["chunks"][-1]
        assert last["finish_reason"] == "length" and last["completion_tokens"] == MAX_TOKENS, last
        assert not any("error" in c for c in res["chunks"])
    code = hardened.proc.proc.wait(GRACE_PERIOD + 30)
    assert code == 0, hardened.proc.tail()
    assert time.monotonic() - sent < GRACE_PERIOD + 20
    log = hardened.proc.log_path.read_text(errors="replace")
    assert "draining 2 request(s) in flight" in log and "drained: no request in flight" in log

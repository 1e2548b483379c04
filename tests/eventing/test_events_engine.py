"""POST /events on the real `evllm serve`: the session server, started as `make serve` starts it, with
K_SINK set to the test broker, which (like a Knative Trigger) delivers each batch.chunk back to /events.
So a batch job submitted here completes by itself, through the broker. Local mode (no K_SINK) is
covered engine-free (test_batch_jobs.py); delivery by hand and crash recovery in test_crash_recovery.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent, from_http

from eventing.cli import job_status
from tests.conftest import ADAPTER_NAME, MODEL_NAME, REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS

from .batchdata import check_outputs, completion_line, mixed_lines, read_jsonl

pytestmark = pytest.mark.slow


def post(url: str, event: CloudEvent, *, binary: bool = True, timeout: float = 120) -> httpx.Response:
    headers, body = (to_binary if binary else to_structured)(event)
    return httpx.post(url + "/events", headers=headers, content=body, timeout=timeout)


def inference(data: object, **attrs: object) -> CloudEvent:
    base = {"type": "dev.evllm.inference.request", "source": "/tests/engine", "id": f"r-{time.time_ns()}",
            "subject": "s1", "model": MODEL_NAME}  # fmt: skip
    return CloudEvent({**base, **attrs}, data)


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "structured"])
def test_inference_event_reply(server, binary: bool) -> None:
    event = inference({"text_input": "Hello world", "parameters": {"max_tokens": 5, "temperature": 0}})
    resp = post(server.url, event, binary=binary)
    assert resp.status_code == 200, resp.text
    reply = from_http(dict(resp.headers), resp.content)
    assert reply["type"] == "dev.evllm.inference.response" != event["type"]
    assert reply["requestid"] == event["id"] and reply["subject"] == "s1" and reply["model"] == MODEL_NAME
    assert reply.data["model_name"] == MODEL_NAME
    assert reply.data["usage"]["completion_tokens"] == 5 and reply.data["text_output"]
    # A redelivery (same source + id) gets the same reply event.
    again = from_http(*(lambda r: (dict(r.headers), r.content))(post(server.url, event, binary=binary)))
    assert again["id"] == reply["id"] and again.data == reply.data


def test_chat_inference_event(server) -> None:
    data = {
        "messages": [{"role": "user", "content": "Hi"}],
        "parameters": {"max_tokens": 4, "temperature": 0},
    }
    resp = post(server.url, inference(data))
    assert resp.status_code == 200, resp.text
    reply = from_http(dict(resp.headers), resp.content)
    assert reply.data["usage"]["completion_tokens"] == 4
    assert reply.data["chat_completion"]["object"] == "chat.completion"


@pytest.mark.parametrize(
    ("headers", "body", "fragment"),
    [
        ({"ce-specversion": "1.0", "ce-source": "/t", "ce-type": "dev.evllm.inference.request"}, b"{}", "ce-id"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t"}, b"{}", "ce-type"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-type": "dev.evllm.inference.request"}, b"{}", "ce-source"),
        ({"content-type": "application/cloudevents+json"},
         b'{"id":"1","source":"/t","type":"dev.evllm.inference.request"}', "specversion"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t", "ce-type": "dev.evllm.inference.request",
          "content-type": "application/json"}, b'{"text_input": 5}', "text_input"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t", "ce-type": "dev.evllm.inference.request",
          "content-type": "application/json"}, b"{bad json", "JSON"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t", "ce-type": "dev.evllm.inference.request",
          "ce-model": "gpt-9", "content-type": "application/json"}, b'{"text_input": "x"}', "gpt-9"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t", "ce-type": "dev.evllm.inference.request",
          "content-type": "application/json"},
         b'{"text_input": "x", "parameters": {"max_tokens": 100000}}', "max"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/t", "ce-type": "com.example.unknown"}, b"",
         "unsupported event type"),
    ],
)  # fmt: skip
def test_malformed_events_are_clear_4xx(server, headers: dict, body: bytes, fragment: str) -> None:
    resp = httpx.post(server.url + "/events", headers=headers, content=body, timeout=60)
    assert 400 <= resp.status_code < 500, resp.text
    assert fragment in resp.json()["error"]


def test_invalid_conformance_events_over_http(server) -> None:
    from .test_cloudevents import INVALID

    for case in INVALID:
        resp = httpx.post(server.url + "/events", content=json.dumps(case["event"]),
                          headers={"content-type": "application/cloudevents+json"}, timeout=30)  # fmt: skip
        assert resp.status_code == 400, (case["id"], resp.text)
        assert resp.json()["error"]


def wait_completed(output: Path, job_id: str, timeout: float = 300) -> dict:
    """Poll the job's files (what `evllm batch status` reads) until the broker's deliveries finished it."""
    deadline = time.monotonic() + timeout
    while (status := job_status(str(output), job_id))["state"] != "completed":
        assert time.monotonic() < deadline, f"job {job_id} not completed after {timeout}s: {status}"
        time.sleep(0.5)
    return status


def metric(url: str, name: str, **labels: str) -> float:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", timeout=10).text
    return sum(
        s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_batch_job_completes_through_the_broker(
    server, broker, storage_root: Path, offline_reference: list[dict]
) -> None:
    """batch.submitted -> one batch.chunk per chunk to K_SINK -> the broker delivers them back -> the
    job completes; greedy lines match vLLM's offline output token for token."""
    lines, good, bad = mixed_lines(12)
    refs = [
        completion_line(f"ref-{i}", p, max_tokens=REFERENCE_MAX_TOKENS)
        for i, p in enumerate(REFERENCE_PROMPTS)
    ]
    inp = storage_root / "broker-in.jsonl"
    inp.write_text("\n".join([*lines, *map(json.dumps, refs)]) + "\n")
    out = storage_root / "out"
    data = {"job_id": "broker-e2e", "input": f"file://{inp}", "output": str(out), "chunk_size": 5}
    event = CloudEvent({"type": "dev.evllm.batch.submitted", "source": "/tests", "id": "sub-broker",
                        "model": MODEL_NAME}, data)  # fmt: skip
    batch_tokens = metric(server.url, "evllm_completion_tokens_total", protocol="batch")
    resp = post(server.url, event)
    assert resp.status_code == 200, resp.text
    accepted = from_http(dict(resp.headers), resp.content)
    assert accepted["type"] == "dev.evllm.batch.progress" and accepted.data["chunks_total"] == 5
    chunks = broker.chunks("broker-e2e")
    assert sorted(chunks) == [0, 1, 2, 3, 4]
    assert all(c["type"] == "dev.evllm.batch.chunk" and c["model"] == MODEL_NAME for c in chunks.values())
    # Delivered twice while running: the missing chunks are emitted again (same ids), still one result.
    assert post(server.url, event).status_code == 200
    status = wait_completed(out, "broker-e2e")
    assert status["chunks_done"] == status["chunks_total"] == 5
    job = out / "broker-e2e"
    result = check_outputs(job, good | {f"ref-{i}" for i in range(len(refs))}, bad)
    errors = {r["custom_id"]: r for r in read_jsonl(job / "errors.jsonl")}
    assert "duplicate" in errors["ok-1"]["error"]["message"]
    assert errors["bad-param"]["response"]["status_code"] == 400  # rejected by vLLM, not by us
    assert "max_tokens" in errors["bad-param"]["error"]["message"]
    outputs = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(job / "output.jsonl")}
    for i, ref in enumerate(offline_reference):
        body = outputs[f"ref-{i}"]
        assert body["choices"][0]["text"] == ref["text"]
        assert body["usage"]["completion_tokens"] == len(ref["token_ids"])
    # The engine work was counted as batch work (not as the /events requests that carried it).
    assert metric(server.url, "evllm_completion_tokens_total", protocol="batch") > batch_tokens
    # Delivered again after completion: the same completed event (id), and files unchanged.
    before = (job / "output.jsonl").read_bytes()
    reply = from_http(*(lambda r: (dict(r.headers), r.content))(post(server.url, event)))
    assert reply["type"] == "dev.evllm.batch.completed" and reply["id"] == result["event_id"]
    assert (job / "output.jsonl").read_bytes() == before


def test_batch_job_with_missing_input_fails_naming_it(server, storage_root: Path) -> None:
    missing = storage_root / "nope.jsonl"
    data = {"job_id": "missing", "input": str(missing), "output": str(storage_root / "out")}
    event = CloudEvent({"type": "dev.evllm.batch.submitted", "source": "/tests", "id": "m1"}, data)
    reply = from_http(*(lambda r: (dict(r.headers), r.content))(post(server.url, event)))
    assert reply["type"] == "dev.evllm.batch.failed" and str(missing) in reply.data["error"]


def evllm(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "evllm", *args], capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parents[2])  # fmt: skip


@pytest.mark.parametrize("mode", ["--binary", "--structured"])
def test_cli_send(server, mode: str) -> None:
    res = evllm("send", server.url + "/events", "--type", "dev.evllm.inference.request", "--model_name", MODEL_NAME,
                "--id", f"cli-{mode}", "--data", '{"text_input": "Hello", "parameters": {"max_tokens": 3}}', mode)  # fmt: skip
    assert res.returncode == 0, res.stderr
    reply = json.loads(res.stdout)
    assert reply["type"] == "dev.evllm.inference.response" and reply["requestid"] == f"cli-{mode}"
    bad = evllm("send", server.url + "/events", "--type", "dev.evllm.nope", "--data", "{}")
    assert bad.returncode == 1 and "unsupported event type" in bad.stderr


def test_cli_batch_submit_and_status(server, storage_root: Path) -> None:
    lines, good, bad = mixed_lines(4)
    inp = storage_root / "cli-in.jsonl"
    inp.write_text("\n".join(lines) + "\n")
    out = storage_root / "cli-out"
    res = evllm("batch", "submit", server.url + "/events", "--input", str(inp), "--output", str(out),
                "--job_id", "cli-job", "--chunk_size", "3", "--model_name", MODEL_NAME)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["type"] == "dev.evllm.batch.progress"
    wait_completed(out, "cli-job")  # the broker delivers the chunks
    res = evllm("batch", "status", str(out), "--job_id", "cli-job")
    assert res.returncode == 0, res.stderr
    status = json.loads(res.stdout)
    assert status["state"] == "completed" and status["chunks_done"] == status["chunks_total"] == 3
    assert status["request_counts"] == {"total": len(good) + bad, "completed": len(good), "failed": bad}


def test_an_adapter_name_in_the_model_extension(server, adapter_reference: list[dict]) -> None:
    """`make serve` serves the demo adapter as `demo-lora`: an event naming it runs through it (vLLM's
    offline output with the same LoRARequest), and the reply carries its name, so Triggers can route it."""
    data = {
        "text_input": REFERENCE_PROMPTS[0],
        "parameters": {"max_tokens": REFERENCE_MAX_TOKENS, "temperature": 0},
    }
    resp = post(server.url, inference(data, model=ADAPTER_NAME))
    assert resp.status_code == 200, resp.text
    reply = from_http(dict(resp.headers), resp.content)
    assert reply["model"] == ADAPTER_NAME and reply.data["model_name"] == ADAPTER_NAME
    assert reply.data["text_output"] == adapter_reference[0]["text"]
    resp = post(server.url, inference(data, model="nope"))
    assert resp.status_code == 400 and f"'{MODEL_NAME}', '{ADAPTER_NAME}'" in resp.json()["error"]


def test_a_batch_job_mixes_base_and_adapter_lines(
    server, storage_root: Path, offline_reference: list[dict], adapter_reference: list[dict]
) -> None:
    """One job, lines for the base model and for the adapter (`body.model`), and one for a name not
    served (an error line naming it): each line's output is its model's offline output."""
    lines = [
        completion_line(f"{model}-{i}", p, max_tokens=REFERENCE_MAX_TOKENS, model=model)
        for i, p in enumerate(REFERENCE_PROMPTS)
        for model in (MODEL_NAME, ADAPTER_NAME)
    ]
    lines.append(completion_line("unknown", "x", model="nope"))
    inp = storage_root / "lora-in.jsonl"
    inp.write_text("\n".join(map(json.dumps, lines)) + "\n")
    out = storage_root / "lora-out"
    data = {"job_id": "lora-mix", "input": f"file://{inp}", "output": str(out), "chunk_size": 3}
    event = CloudEvent({"type": "dev.evllm.batch.submitted", "source": "/tests", "id": "sub-lora"}, data)
    assert post(server.url, event).status_code == 200
    wait_completed(out, "lora-mix")
    job = out / "lora-mix"
    outputs = {r["custom_id"]: r["response"]["body"] for r in read_jsonl(job / "output.jsonl")}
    for i in range(len(REFERENCE_PROMPTS)):
        assert outputs[f"{MODEL_NAME}-{i}"]["choices"][0]["text"] == offline_reference[i]["text"]
        assert outputs[f"{ADAPTER_NAME}-{i}"]["choices"][0]["text"] == adapter_reference[i]["text"]
        assert outputs[f"{ADAPTER_NAME}-{i}"]["model"] == ADAPTER_NAME
    (error,) = read_jsonl(job / "errors.jsonl")
    assert error["custom_id"] == "unknown" and error["response"]["status_code"] == 404
    assert "nope" in error["error"]["message"]

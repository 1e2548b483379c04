"""OpenAI batch files, and evllm batch jobs submitted as `<prefix>.batch.submitted` CloudEvents or through
the OpenAI Batch API (`/openai/v1/files` + `/openai/v1/batches`, with the official client)."""

from __future__ import annotations

import json
import time
import urllib.request
import uuid
from pathlib import Path

from .load import OUTPUT_TOKENS, PROMPTS
from .servers import MODEL_NAME

PREFIX = "dev.evllm"


def write_batch_file(path: Path, lines: int) -> Path:
    """`lines` /v1/chat/completions lines (the only URL run_batch takes), 32 tokens each, ignore_eos."""
    with open(path, "w") as fh:
        for i in range(lines):
            body = {
                "model": MODEL_NAME,
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": OUTPUT_TOKENS,
                "temperature": 0.0,
                "ignore_eos": True,
            }
            line = {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}
            fh.write(json.dumps(line) + "\n")
    return path


def count_output(path: Path) -> tuple[int, int]:
    """(successful lines, completion tokens) of an OpenAI batch output file."""
    ok = tokens = 0
    with open(path) as fh:
        for raw in fh:
            rec = json.loads(raw)
            resp = rec.get("response") or {}
            if rec.get("error") is None and resp.get("status_code") == 200:
                ok += 1
                tokens += resp["body"]["usage"]["completion_tokens"]
    return ok, tokens


def submit(base_url: str, inp: Path, out: Path, job_id: str, chunk_size: int | None) -> dict:
    """POST a binary-mode batch.submitted event to the predictor's /events; returns the reply's data."""
    data: dict = {"job_id": job_id, "input": str(inp), "output": str(out)}
    if chunk_size:
        data["chunk_size"] = chunk_size
    headers = {
        "ce-specversion": "1.0",
        "ce-id": uuid.uuid4().hex,
        "ce-source": "/evllm/bench",
        "ce-type": f"{PREFIX}.batch.submitted",
        "ce-model": MODEL_NAME,
        "ce-subject": job_id,
        "content-type": "application/json",
    }
    req = urllib.request.Request(base_url + "/events", json.dumps(data).encode(), headers, method="POST")
    with urllib.request.urlopen(req, timeout=600) as resp:
        if resp.status != 200 or resp.headers.get("ce-type") != f"{PREFIX}.batch.progress":
            raise RuntimeError(f"batch.submitted: HTTP {resp.status} {resp.headers.get('ce-type')}")
        return json.loads(resp.read())


def wait_done(out: Path, job_id: str, timeout: float = 3600.0, poll: float = 0.1) -> dict:
    """Poll the job's result.json (written last, atomically) and return it."""
    result = out / job_id / "result.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result.exists():
            return json.loads(result.read_text())
        time.sleep(poll)
    raise TimeoutError(f"batch job {job_id} not done after {timeout:.0f}s")


def run_job(
    base_url: str, inp: Path, out: Path, chunk_size: int | None, timeout: float = 3600.0
) -> tuple[float, Path]:
    """Submit and wait: seconds from submit to result.json, and the merged output file."""
    job_id = f"bench-{uuid.uuid4().hex[:8]}"
    t0 = time.perf_counter()
    submit(base_url, inp, out, job_id, chunk_size)
    wait_done(out, job_id, timeout)
    return time.perf_counter() - t0, out / job_id / "output.jsonl"


FINISHED = ("completed", "failed", "expired", "cancelled")


def run_http_job(
    base_url: str, inp: Path, out: Path, timeout: float = 3600.0, poll: float = 0.1
) -> tuple[float, Path]:
    """The same job through the OpenAI Batch API with the official client: upload, create, poll until it
    ends. Seconds from the upload to the finished batch, and its output file (downloaded after timing)."""
    import openai

    client = openai.OpenAI(base_url=base_url + "/openai/v1", api_key="bench", max_retries=0, timeout=600)
    t0 = time.perf_counter()
    with open(inp, "rb") as fh:
        uploaded = client.files.create(file=(inp.name, fh), purpose="batch")
    batch = client.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = time.monotonic() + timeout
    while batch.status not in FINISHED:
        if time.monotonic() > deadline:
            raise TimeoutError(f"batch {batch.id} still {batch.status} after {timeout:.0f}s")
        time.sleep(poll)
        batch = client.batches.retrieve(batch.id)
    secs = time.perf_counter() - t0
    if batch.status != "completed" or batch.output_file_id is None:
        raise RuntimeError(f"batch {batch.id} ended {batch.status}: {batch.request_counts}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(client.files.content(batch.output_file_id).content)
    client.close()
    return secs, out

"""The OpenAI Batch API on the real `evllm serve` (the session server: sink mode, the test broker delivers
each batch.chunk back): the official client's flow, and a cancel while lines run in the engine, where
vLLM's serving classes answer the aborted requests themselves ("Client disconnected")."""

from __future__ import annotations

import json
import time
from typing import Any

import openai
import pytest

from tests.conftest import MODEL_NAME, REFERENCE_PROMPTS

from .test_events_engine import metric

pytestmark = pytest.mark.slow


def jsonl(n: int, **body: Any) -> bytes:
    rows = [
        json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
                    "body": {"model": MODEL_NAME, "prompt": REFERENCE_PROMPTS[i % len(REFERENCE_PROMPTS)],
                             "temperature": 0, **body}})
        for i in range(n)
    ]  # fmt: skip
    return ("\n".join(rows) + "\n").encode()


def wait(client: openai.OpenAI, batch_id: str, timeout: float = 300) -> Any:
    deadline = time.monotonic() + timeout
    while (batch := client.batches.retrieve(batch_id)).status not in (
        "completed",
        "failed",
        "expired",
        "cancelled",
    ):
        assert time.monotonic() < deadline, f"{batch_id} still {batch.status}"
        time.sleep(0.2)
    return batch


def test_openai_batch_flow_and_cancel_on_the_real_engine(server) -> None:
    with openai.OpenAI(base_url=server.url + "/openai/v1", api_key="unused", max_retries=0) as client:
        flow_and_cancel(client, server.url)


def flow_and_cancel(client: openai.OpenAI, url: str) -> None:
    f = client.files.create(file=("small.jsonl", jsonl(4, max_tokens=8)), purpose="batch")
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    done = wait(client, batch.id)
    assert done.status == "completed" and done.request_counts.completed == 4  # type: ignore[union-attr]
    out = [json.loads(x) for x in client.files.content(done.output_file_id).text.splitlines()]  # type: ignore[arg-type]
    assert sorted(r["custom_id"] for r in out) == ["r0", "r1", "r2", "r3"]
    assert all(r["response"]["body"]["usage"]["completion_tokens"] == 8 for r in out)
    assert batch.id in [b.id for b in client.batches.list(limit=5).data]

    # A job long enough to be in the engine when cancelled (~3 s per 128 lines on 2 CPU cores).
    aborted_chunks = metric(url, "evllm_batch_cancel_seconds_count")
    f = client.files.create(
        file=("long.jsonl", jsonl(1024, max_tokens=128, ignore_eos=True)), purpose="batch"
    )
    batch = client.batches.create(input_file_id=f.id, endpoint="/v1/completions", completion_window="24h")
    time.sleep(3)
    assert client.batches.cancel(batch.id).status in ("cancelling", "cancelled")
    done = wait(client, batch.id, timeout=120)
    counts = done.request_counts
    assert done.status == "cancelled" and counts is not None and counts.total == 1024 and counts.failed > 0
    errors = [json.loads(x) for x in client.files.content(done.error_file_id).text.splitlines()]  # type: ignore[arg-type]
    assert len(errors) == counts.failed and {e["error"]["code"] for e in errors} == {"cancelled"}
    # Lines were in the engine and were aborted there (each chunk's cancel -> last abort is timed).
    assert metric(url, "evllm_batch_cancel_seconds_count") > aborted_chunks

"""Cancel latency against a running evllm serve (`python -m bench.cancel --url http://localhost:8080`): a
batch through the OpenAI Batch API, cancelled while its lines run (``--after`` seconds in); reports the time from the
cancel to the last aborted in-engine line (the server's `evllm_batch_cancel_seconds`, per chunk: its
mean and the bucket holding the slowest) and, seen by the client, from the cancel to status `cancelled`.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import Any

import httpx

from .batchjobs import FINISHED
from .load import OUTPUT_TOKENS, PROMPTS
from .servers import MODEL_NAME

METRIC = "evllm_batch_cancel_seconds"


def _histogram(url: str) -> dict[str, float]:
    """The cancel histogram's samples (name + le -> value), summed over models."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[str, float] = {}
    for family in text_string_to_metric_families(httpx.get(url + "/metrics", timeout=30).text):
        if family.name != METRIC:
            continue
        for s in family.samples:
            key = s.name + (f"le={s.labels['le']}" if "le" in s.labels else "")
            out[key] = out.get(key, 0.0) + s.value
    return out


def _jsonl(lines: int, max_tokens: int) -> bytes:
    rows = []
    for i in range(lines):
        body = {"model": MODEL_NAME, "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens, "temperature": 0.0, "ignore_eos": True}  # fmt: skip
        rows.append(
            json.dumps({"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body})
        )
    return ("\n".join(rows) + "\n").encode()


def measure(
    url: str, lines: int = 512, max_tokens: int = OUTPUT_TOKENS * 4, after: int = 8
) -> dict[str, Any]:
    import openai

    client = openai.OpenAI(base_url=url + "/openai/v1", api_key="bench", max_retries=0, timeout=600)
    before = _histogram(url)
    f = client.files.create(file=("cancel.jsonl", _jsonl(lines, max_tokens)), purpose="batch")
    batch = client.batches.create(
        input_file_id=f.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    while (
        batch.request_counts is None or batch.request_counts.completed < after
    ) and batch.status not in FINISHED:
        time.sleep(0.05)
        batch = client.batches.retrieve(batch.id)
    t0 = time.perf_counter()
    client.batches.cancel(batch.id)
    while batch.status not in FINISHED:
        time.sleep(0.02)
        batch = client.batches.retrieve(batch.id)
    until_cancelled = time.perf_counter() - t0
    after_h = _histogram(url)
    delta = {k: after_h.get(k, 0.0) - before.get(k, 0.0) for k in after_h}
    count = delta.get(METRIC + "_count", 0.0)
    buckets = sorted(
        (float(k.split("le=")[1]), v) for k, v in delta.items() if k.startswith(METRIC + "_bucketle=")
    )
    slowest = next((le for le, v in buckets if v >= count), None) if count else None
    client.close()
    return {
        "batch": batch.id,
        "status": batch.status,
        "request_counts": batch.request_counts.model_dump() if batch.request_counts else None,
        "chunks_with_aborted_lines": count,
        "mean_cancel_to_last_abort_s": delta.get(METRIC + "_sum", 0.0) / count if count else None,
        "slowest_chunk_at_most_s": slowest,
        "client_cancel_to_cancelled_s": until_cancelled,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.cancel", description=__doc__)
    p.add_argument("--url", required=True, help="a running evllm serve (its /openai/v1 and /metrics)")
    p.add_argument("--lines", type=int, default=512)
    p.add_argument("--max-tokens", type=int, default=OUTPUT_TOKENS * 4)
    p.add_argument("--after", type=float, default=3.0, help="seconds after the create to cancel")
    a = p.parse_args(argv)
    print(json.dumps(measure(a.url, a.lines, a.max_tokens, a.after), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Batch inputs shared by the engine-free and the real-engine tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def completion_line(
    custom_id: str, prompt: str, max_tokens: int = 4, model: str = "demo", **extra: Any
) -> dict[str, Any]:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, **extra}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/completions", "body": body}


def chat_line(custom_id: str, content: str) -> dict[str, Any]:
    body = {"model": "demo", "messages": [{"role": "user", "content": content}], "max_tokens": 4}
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions", "body": body}


def mixed_lines(good: int) -> tuple[list[str], set[str], int]:
    """JSONL lines: ``good`` valid requests (completions and chat) plus one of each kind of bad line.
    Returns (lines, good custom_ids, number of bad lines)."""
    lines = []
    good_ids = set()
    for i in range(good):
        line = completion_line(f"ok-{i}", f"hello {i}") if i % 3 else chat_line(f"ok-{i}", f"hi {i}")
        lines.append(json.dumps(line))
        good_ids.add(f"ok-{i}")
    bad = [
        "{not json",
        json.dumps({"custom_id": "bad-url", "method": "POST", "url": "/v1/embeddings", "body": {}}),
        json.dumps({"custom_id": "bad-body", "method": "POST", "url": "/v1/completions", "body": [1]}),
        json.dumps({"custom_id": "ok-1", "method": "POST", "url": "/v1/completions",
                    "body": {"model": "demo", "prompt": "dup"}}),
        json.dumps({"custom_id": "bad-param", "method": "POST", "url": "/v1/completions",
                    "body": {"model": "demo", "prompt": "x", "max_tokens": -5}}),
    ]  # fmt: skip
    return lines[:3] + bad + lines[3:], good_ids, len(bad)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def check_outputs(job_dir: Path, good_ids: set[str], bad: int) -> dict[str, Any]:
    """The merged files of a finished job: each good custom_id exactly once, bad lines in errors."""
    result = json.loads((job_dir / "result.json").read_text())
    out = read_jsonl(job_dir / "output.jsonl")
    errs = read_jsonl(job_dir / "errors.jsonl")
    ids = [r["custom_id"] for r in out]
    assert sorted(ids) == sorted(good_ids), "each good custom_id exactly once"
    for r in out:
        assert set(r) == {"id", "custom_id", "response", "error"} and r["error"] is None
        assert r["response"]["status_code"] == 200 and r["response"]["body"]["choices"]
    assert len(errs) == bad
    for r in errs:
        assert set(r) == {"id", "custom_id", "response", "error"} and r["error"]["message"]
    assert len({r["id"] for r in out + errs}) == len(out) + len(errs)
    total = len(good_ids) + bad
    assert result["request_counts"] == {"total": total, "completed": len(good_ids), "failed": bad}
    return result

"""The event catalog: every event type evllm consumes or produces, with a JSON schema for its data.

Types are ``<prefix>.<name>`` (``--events_prefix``, default ``dev.evllm``); the schemas live beside this
file as ``<name>.json`` so docs, tests and other producers can read them.
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema

from predictors.errors import InvalidInput

HERE = Path(__file__).resolve().parent

# name -> (direction, meaning). "in": POST it to /events; "out": emitted as a reply or to K_SINK.
TYPES: dict[str, tuple[str, str]] = {
    "inference.request": ("in", "synchronous generation; reply inference.response"),
    "inference.response": ("out", "reply to inference.request"),
    "batch.submitted": ("in", "submit a batch job; reply batch.progress (accepted) or batch.failed"),
    "batch.chunk": ("in/out", "one chunk of a job, emitted to K_SINK and delivered back"),
    "batch.cancel": ("in", "cancel a job; reply batch.progress (cancelling) or its final event"),
    "batch.progress": ("out", "job accepted / chunk done / cancel requested (+ the OpenAI batch object)"),
    "batch.completed": ("out", "all chunks done: merged output, error file, request counts (+ batch object)"),
    "batch.cancelled": ("out", "a cancelled job finished (+ the OpenAI batch object)"),
    "batch.failed": ("out", "job rejected"),
}
CONSUMED = tuple(name for name, (direction, _) in TYPES.items() if "in" in direction.split("/"))


@cache
def schema(name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads((HERE / f"{name}.json").read_text())
    return obj


def errors(name: str, data: Any) -> list[str]:
    """Every way ``data`` violates the schema of ``name``, one readable line each."""
    validator = jsonschema.Draft202012Validator(schema(name))
    out = []
    for err in sorted(validator.iter_errors(data), key=lambda e: list(map(str, e.absolute_path))):
        where = ".".join(str(p) for p in err.absolute_path)
        out.append(f"data.{where}: {err.message}" if where else f"data: {err.message}")
    return out


def check(name: str, data: Any, error: type[InvalidInput] = InvalidInput) -> None:
    problems = errors(name, data)
    if problems:
        raise error(f"{name} event data is invalid: " + "; ".join(problems[:5]))

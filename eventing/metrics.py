"""Batch job, chunk and line metrics, exported at ``/metrics`` beside the server's own (same registry).

Labels are bounded: ``model`` is the served model name, ``outcome`` one of the tuples below.
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

from predictors import metrics as server_metrics

JOB_OUTCOMES = ("accepted", "completed", "failed", "cancelled")
CHUNK_OUTCOMES = ("completed", "skipped", "failed", "retried")
LINE_OUTCOMES = ("succeeded", "failed")
# The `protocol` label of engine work done for batch lines (set around each line, see executor).
BATCH_PROTOCOL = "batch"
EVENTS_PROTOCOL = "events"

JOBS = Counter("evllm_batch_jobs", "Batch jobs by outcome.", ["model", "outcome"])
CHUNKS = Counter("evllm_batch_chunks", "Batch chunks by outcome.", ["model", "outcome"])
LINES = Counter(
    "evllm_batch_lines", "Batch lines (one engine request each) by outcome.", ["model", "outcome"]
)
INFLIGHT = Gauge("evllm_batch_inflight", "Batch lines in the engine now.", ["model"])
INFLIGHT_LIMIT = Gauge(
    "evllm_batch_inflight_limit",
    "Batch lines allowed in the engine now (lower while online traffic runs).",
    ["model"],
)

CANCEL_SECONDS = Histogram(
    "evllm_batch_cancel_seconds",
    "Time from a batch cancel to the last of its in-engine lines aborted on this replica, per chunk.",
    ["model"],
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)


def init() -> None:
    """Every series at zero, so dashboards and alerts see them before the first job."""
    model = server_metrics.model()
    for o in JOB_OUTCOMES:
        JOBS.labels(model, o)
    for o in CHUNK_OUTCOMES:
        CHUNKS.labels(model, o)
    for o in LINE_OUTCOMES:
        LINES.labels(model, o)
    INFLIGHT.labels(model).set(0)
    INFLIGHT_LIMIT.labels(model).set(0)


def job(outcome: str) -> None:
    JOBS.labels(server_metrics.model(), _check(outcome, JOB_OUTCOMES)).inc()


def chunk(outcome: str) -> None:
    CHUNKS.labels(server_metrics.model(), _check(outcome, CHUNK_OUTCOMES)).inc()


def line(outcome: str) -> None:
    LINES.labels(server_metrics.model(), _check(outcome, LINE_OUTCOMES)).inc()


def cancel_latency(seconds: float) -> None:
    CANCEL_SECONDS.labels(server_metrics.model()).observe(max(0.0, seconds))


def inflight(now: int, limit: int) -> None:
    INFLIGHT.labels(server_metrics.model()).set(now)
    INFLIGHT_LIMIT.labels(server_metrics.model()).set(limit)


def _check(value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ValueError(f"{value!r} is not one of {allowed}")
    return value

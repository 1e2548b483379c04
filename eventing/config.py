"""`evllm serve`'s settings for CloudEvents and batch jobs (one flag group, each also an env variable)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from predictors.settings import SettingsError, setting

MiB = 1024 * 1024
DEFAULT_PREFIX = "dev.evllm"
BATCH_PRIORITY = 10  # vLLM serves lower numbers first; online traffic uses 0


@dataclass(frozen=True)
class EventingConfig:
    events_prefix: str = setting(
        DEFAULT_PREFIX, "Event type prefix: <prefix>.inference.request, <prefix>.batch.submitted, ..."
    )
    storage_roots: list[str] = setting(
        ["./evllm-data"],
        "Comma-separated local directories that batch input/output paths (plain or file://) must stay "
        "inside; s3://, gs://, ... URIs are not confined.",
    )
    batch_chunk_size: int = setting(64, "Batch lines per chunk when the job does not say.")
    # Measured on 2 CPU cores at online concurrency 4: 128 batch sequences in flight cost online p95 x95,
    # 4 cost x1.1-2.0 (noisy), 1 or 2 cost x1.1. On a GPU a few more sequences per step cost little.
    batch_max_inflight: int = setting(256, "Batch sequences in flight when no online request runs.")
    batch_online_inflight: int = setting(
        1, "Batch sequences in flight while online requests run or wait (raise it on GPUs)."
    )
    # Inline batch jobs ride in events; bigger ones belong in storage.
    max_event_bytes: int = setting(64 * MiB, "Largest CloudEvent (body of POST /events, data included).")
    max_batch_lines: int = setting(50_000, "Most lines in one batch job (the OpenAI Batch API's limit).")
    batch_store: str | None = setting(
        None,
        "Where the OpenAI Files and Batches API (/openai/v1/files, /openai/v1/batches) keeps files, batch "
        "records and their jobs: a directory inside --storage_roots or an s3://, gs://, ... URI that "
        "every replica shares; unset: <first storage root>/openai.",
    )
    max_file_bytes: int = setting(200 * MiB, "Largest file uploaded to /openai/v1/files (OpenAI's limit).")
    # Knative's per-attempt timeout (600 s in triggers.yaml) bounds a whole chunk delivery: retrying
    # one operation for 30 s keeps a short outage invisible and answers a long one with 503 in time.
    storage_retry_seconds: float = setting(
        30.0,
        "How long one storage operation retries transient faults (timeouts, 5xx, dropped connections) "
        "with backoff, on top of the storage client's own retries; then a CloudEvent gets 503 (Knative "
        "redelivers it) and a local job waits and tries again. 0: the client's retries only.",
    )
    storage_events_output: str | None = setting(
        None,
        "Directory URI for the output of jobs that object-created storage events start (S3, MinIO, "
        "GCS bucket notifications; the new object is the job's input); {bucket} is the event's bucket, "
        "e.g. s3://{bucket}/evllm-output. Unset: such events are refused (400).",
    )
    sink: str | None = setting(
        None,
        "Where batch chunks are sent as events (a Knative SinkBinding injects K_SINK); unset: this "
        "replica runs every chunk itself.",
        env="K_SINK",
    )

    def check(self) -> None:
        for name in (
            "batch_chunk_size",
            "batch_max_inflight",
            "batch_online_inflight",
            "max_batch_lines",
            "max_file_bytes",
        ):
            if getattr(self, name) < 1:
                raise SettingsError(f"--{name} must be at least 1")
        if self.storage_retry_seconds < 0:
            raise SettingsError("--storage_retry_seconds must not be negative")

    @property
    def roots(self) -> list[Path]:
        return [Path(r) for r in self.storage_roots]

    @property
    def store_uri(self) -> str:
        if self.batch_store:
            return self.batch_store
        if not self.storage_roots:
            raise SettingsError("--batch_store is required when no --storage_roots are configured")
        return str(Path(self.storage_roots[0]) / "openai")

    def type(self, name: str) -> str:
        """The full event type for a catalog name such as ``batch.chunk``."""
        return f"{self.events_prefix}.{name}"

"""`evllm serve` flags for CloudEvents and batch jobs, and the settings object built from them."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, field
from pathlib import Path

DEFAULT_PREFIX = "dev.evllm"
# Local paths (plain or file://) must stay inside these directories; cloud URIs are not confined.
DEFAULT_STORAGE_ROOT = "./evllm-data"
DEFAULT_CHUNK_SIZE = 64
# Batch sequences in flight when the engine is otherwise idle, and while online requests run. Measured
# on 2 CPU cores at online concurrency 4: 128 batch sequences in flight cost online p95 x95, 4 cost
# x1.1-2.0 (noisy), 1 or 2 cost x1.1. On a GPU a few more sequences per step cost little: raise it there.
DEFAULT_MAX_INFLIGHT = 256
DEFAULT_ONLINE_INFLIGHT = 1
BATCH_PRIORITY = 10  # vLLM serves lower numbers first; online traffic uses 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("eventing", "CloudEvents endpoint (POST /events) and batch jobs")
    group.add_argument(
        "--events_prefix",
        default=DEFAULT_PREFIX,
        help=f"Event type prefix: <prefix>.inference.request, <prefix>.batch.submitted, ... "
        f"(default {DEFAULT_PREFIX}).",
    )
    group.add_argument(
        "--storage_roots",
        default=DEFAULT_STORAGE_ROOT,
        help="Comma-separated local directories that batch input/output paths (plain or file://) must "
        f"stay inside (default {DEFAULT_STORAGE_ROOT} under the working directory). s3://, gs://, ... "
        "URIs are not confined.",
    )
    group.add_argument(
        "--batch_chunk_size",
        type=int,
        default=DEFAULT_CHUNK_SIZE,
        help=f"Batch lines per chunk when the job does not say (default {DEFAULT_CHUNK_SIZE}).",
    )
    group.add_argument(
        "--batch_max_inflight",
        type=int,
        default=DEFAULT_MAX_INFLIGHT,
        help=f"Batch sequences in flight when no online request runs (default {DEFAULT_MAX_INFLIGHT}).",
    )
    group.add_argument(
        "--batch_online_inflight",
        type=int,
        default=DEFAULT_ONLINE_INFLIGHT,
        help="Batch sequences in flight while online requests run or wait "
        f"(default {DEFAULT_ONLINE_INFLIGHT}).",
    )


@dataclass
class EventingConfig:
    prefix: str = DEFAULT_PREFIX
    storage_roots: list[Path] = field(default_factory=lambda: [Path(DEFAULT_STORAGE_ROOT)])
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_inflight: int = DEFAULT_MAX_INFLIGHT
    online_inflight: int = DEFAULT_ONLINE_INFLIGHT
    sink: str | None = None  # K_SINK, injected by a Knative SinkBinding

    @classmethod
    def from_args(cls, args: argparse.Namespace, environ: dict[str, str] | None = None) -> EventingConfig:
        env = os.environ if environ is None else environ
        roots = [
            Path(r.strip()) for r in str(getattr(args, "storage_roots", "") or "").split(",") if r.strip()
        ]
        return cls(
            prefix=getattr(args, "events_prefix", DEFAULT_PREFIX),
            storage_roots=roots,
            chunk_size=getattr(args, "batch_chunk_size", DEFAULT_CHUNK_SIZE),
            max_inflight=getattr(args, "batch_max_inflight", DEFAULT_MAX_INFLIGHT),
            online_inflight=getattr(args, "batch_online_inflight", DEFAULT_ONLINE_INFLIGHT),
            sink=env.get("K_SINK") or None,
        )

    def type(self, name: str) -> str:
        """The full event type for a catalog name such as ``batch.chunk``."""
        return f"{self.prefix}.{name}"

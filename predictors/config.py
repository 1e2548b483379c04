"""`evllm serve`'s own settings (KServe's ModelServer flags and vLLM's engine flags are theirs)."""

from __future__ import annotations

import os
from dataclasses import dataclass

from .settings import setting

DEMO = "demo"  # --model_dir demo: the generated demo model


@dataclass(frozen=True)
class ServerConfig:
    model_dir: str = setting(
        "/mnt/models",
        "Model directory (KServe's storage initializer fills /mnt/models) or Hugging Face id; "
        f"`{DEMO}` serves the generated tiny demo model.",
    )
    cache_dir: str = setting(
        os.path.join(os.path.expanduser("~"), ".cache", "evllm"),
        "Where evllm keeps what a start can reuse: the demo model and adapter, vLLM's compile cache (vllm/, "
        "unless VLLM_CACHE_ROOT is set), Hugging Face downloads (huggingface/, unless HF_HOME is set) and "
        "LoRA adapters from URIs (adapters/); `evllm prepare` fills it.",
    )
    log_format: str = setting(
        "json",
        "json: one JSON object per line with request_id, ce_id and traceparent; text: KServe's.",
        choices=("json", "text"),
    )
    max_concurrent_requests: int = setting(
        128,
        "Requests (POSTs: inference and events, streams until they end) served at once per replica; "
        "past it, 429 with Retry-After.",
    )
    retry_after_seconds: int = setting(1, "Retry-After on 429 answers.")
    # Under Kubernetes' default terminationGracePeriodSeconds of 30.
    grace_period: float = setting(
        25.0,
        "Seconds to finish in-flight requests after SIGTERM (keep it below the pod's "
        "terminationGracePeriodSeconds).",
    )
    drain_seconds: float = setting(
        0.0,
        "Keep answering (503 for new work) at least this long after SIGTERM, while endpoints update.",
    )

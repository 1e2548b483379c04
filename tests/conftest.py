"""Session fixtures: the demo model, and one real `evllm serve` shared by every integration test."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from predictors.demo_model import ensure_demo_model
from tests.server import ROOT, TEST_ENGINE_ARGS, TEST_ENV, ServerProcess, engine_lock

MODEL_NAME = "demo"
# Greedy reference prompts: every served path must reproduce vLLM's offline output token for token.
REFERENCE_PROMPTS = [
    "Hello world",
    "The quick brown fox",
    "Once upon a time there was",
    "Serverless inference",
]
REFERENCE_MAX_TOKENS = 16


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that kill the session server's engine run last, after everything that needs it alive."""
    items.sort(key=lambda item: item.get_closest_marker("kills_engine") is not None)


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one local directory the test server may read batch input from and write output to."""
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def offline_reference(demo_model_dir: Path) -> list[dict[str, Any]]:
    """vLLM offline LLM.generate output for REFERENCE_PROMPTS (greedy), computed once per session."""
    with engine_lock():
        proc = subprocess.run(
            [
                sys.executable,
                str(ROOT / "tests" / "offline_reference.py"),
                str(demo_model_dir),
                str(REFERENCE_MAX_TOKENS),
                json.dumps(REFERENCE_PROMPTS),
            ],
            cwd=ROOT,
            env={**os.environ, **TEST_ENV},
            capture_output=True,
            text=True,
            timeout=600,
        )
    lines = [line for line in proc.stdout.splitlines() if line.startswith("REFERENCE ")]
    assert proc.returncode == 0 and lines, proc.stderr[-3000:]
    return json.loads(lines[-1].removeprefix("REFERENCE "))


@pytest.fixture(scope="session")
def server(
    demo_model_dir: Path, storage_root: Path, offline_reference: list[dict[str, Any]]
) -> Iterator[ServerProcess]:
    # Depends on offline_reference so the two engines never run at the same time.
    with engine_lock():
        proc = ServerProcess(
            [
                "--model_name", MODEL_NAME,
                "--model_dir", str(demo_model_dir),
                "--storage_roots", str(storage_root),
                *TEST_ENGINE_ARGS,
            ],
            log_name="session-server",
        )  # fmt: skip
        proc.start()
        try:
            yield proc
        finally:
            proc.stop()

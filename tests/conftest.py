"""Session fixtures: the demo model, and one real `evllm serve` shared by every integration test."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from predictors.demo_model import ensure_demo_model
from tests.server import TEST_ENGINE_ARGS, ServerProcess, engine_lock

MODEL_NAME = "demo"


@pytest.fixture(scope="session")
def demo_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return ensure_demo_model(tmp_path_factory.mktemp("models") / "demo")


@pytest.fixture(scope="session")
def storage_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The one local directory the test server may read batch input from and write output to."""
    return tmp_path_factory.mktemp("storage")


@pytest.fixture(scope="session")
def server(demo_model_dir: Path, storage_root: Path) -> Iterator[ServerProcess]:
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

"""Fixtures: every kustomize target built once with the real `kubectl kustomize`."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from inferenceservices import manifests

ROOT = Path(__file__).resolve().parents[2]
KUSTOMIZE_ROOT = ROOT / "inferenceservices"
TARGETS = {
    "base": KUSTOMIZE_ROOT / "base",
    "gpu-1x": KUSTOMIZE_ROOT / "overlays" / "gpu-1x",
    "gpu-4x": KUSTOMIZE_ROOT / "overlays" / "gpu-4x",
    "cpu-dev": KUSTOMIZE_ROOT / "overlays" / "cpu-dev",
    "model-cache": KUSTOMIZE_ROOT / "overlays" / "model-cache",
    "spot-batch": KUSTOMIZE_ROOT / "overlays" / "spot-batch",
    "gpu-1x-awq": KUSTOMIZE_ROOT / "overlays" / "gpu-1x-awq",
    "gpu-1x-stream": KUSTOMIZE_ROOT / "overlays" / "gpu-1x-stream",
    "lora": KUSTOMIZE_ROOT / "overlays" / "lora",
    "grpc": KUSTOMIZE_ROOT / "overlays" / "grpc",
}
CRD_DIR = manifests.CRD_DIR  # the vendored CRDs (inferenceservices/crds/SOURCES.md names their commits)


def kustomize(path: Path) -> list[dict[str, Any]]:
    kubectl = shutil.which("kubectl")
    assert kubectl, "kubectl (with built-in kustomize) must be on PATH for these tests"
    out = subprocess.run([kubectl, "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"kubectl kustomize {path} failed: {out.stderr}"
    return manifests.load_documents(out.stdout)


@pytest.fixture(scope="session")
def built() -> dict[str, list[dict[str, Any]]]:
    return {name: kustomize(path) for name, path in TARGETS.items()}


def one(objs: list[dict[str, Any]], kind: str, name: str | None = None) -> dict[str, Any]:
    found = [o for o in objs if o["kind"] == kind and name in (None, o["metadata"]["name"])]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def every(objs: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == kind]

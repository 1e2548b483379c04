"""Each overlay two ways, `evllm render` with that overlay's flags and `kubectl kustomize`: the same objects.

Whole objects are compared, so any field render adds, drops or changes fails here unless it is listed in
DIFFERENCES with the reason it may differ.
"""

from __future__ import annotations

import shlex
from typing import Any

import pytest

from inferenceservices import manifests, render

from .conftest import ROOT, kustomize

# `evllm render` arguments that stand for each overlay. The storage URI is always the overlay's; the other
# flags are the overlay's choices that are not render's defaults for that GPU count.
OVERLAY_ARGS = {
    "cpu-dev": shlex.split("llm hf://Qwen/Qwen2.5-0.5B-Instruct --gpus 0"),
    "gpu-1x": shlex.split("llm hf://Qwen/Qwen2.5-7B-Instruct --gpus 1"),
    # render keeps gpu-1x's 8192 context and base's 30m deadline for any GPU count (a 16k context fails on
    # models trained for 8k); gpu-4x raises both for its 72B model.
    "gpu-4x": shlex.split(
        "llm hf://Qwen/Qwen2.5-72B-Instruct --gpus 4 --max-model-len 16384 --progress-deadline 1h"
    ),
    # No download on a cold start, hence the shorter deadline; otherwise gpu-1x.
    "model-cache": shlex.split(
        "llm pvc://model-cache/qwen2.5-7b-instruct --gpus 1 --progress-deadline 15m "
        "--engine-arg=--safetensors-load-strategy=prefetch"
    ),
}

# (overlay, kind, name) -> why kustomize builds it and render does not.
NOT_RENDERED = {
    ("model-cache", "PersistentVolumeClaim", "model-cache"): (
        "render references storage (storageUri pvc://<claim>/<path>) and never creates it: the claim is "
        "filled once, outside any one model's lifecycle"
    ),
    ("model-cache", "Job", "prepare-model-cache"): (
        "filling the cache (weights, `evllm prepare`) is a one-off step of the model-cache layout, not part "
        "of an InferenceService"
    ),
}

# (overlay, kind, name, field path) -> why render's value may differ from kustomize's. Render builds
# from the same files, so every field of every object it prints is kustomize's but these.
DIFFERENCES: dict[tuple[str, str, str, str], str] = {
    ("model-cache", "InferenceService", "llm", "spec.predictor.model.env"): (
        "render has no environment knob: EVLLM_CACHE_DIR pointing into the volume belongs to the "
        "model-cache layout (its prepare Job), which render does not create"
    ),
}

_MISSING = object()


def differences(ours: Any, theirs: Any, path: str = "") -> list[str]:
    """Dotted paths where two decoded YAML values differ (a list of another length differs as a whole)."""
    if isinstance(ours, dict) and isinstance(theirs, dict):
        return [
            diff
            for key in sorted(set(ours) | set(theirs), key=str)
            for diff in differences(ours.get(key, _MISSING), theirs.get(key, _MISSING), f"{path}.{key}")
        ]
    if isinstance(ours, list) and isinstance(theirs, list) and len(ours) == len(theirs):
        return [
            d
            for i, (a, b) in enumerate(zip(ours, theirs, strict=True))
            for d in differences(a, b, f"{path}[{i}]")
        ]
    return [] if ours == theirs else [path.removeprefix(".") or "<root>"]


def by_identity(objs: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    out = {(o["kind"], o["metadata"]["name"]): o for o in objs}
    assert len(out) == len(objs), "two objects with the same kind and name"
    return out


def rendered(argv: list[str], capsys: pytest.CaptureFixture[str]) -> list[dict[str, Any]]:
    """What `evllm render ARGV` prints, parsed back from YAML."""
    assert render.main(argv) == 0
    out = capsys.readouterr()
    assert out.err == ""
    return manifests.load_documents(out.out)


@pytest.mark.parametrize("overlay", sorted(OVERLAY_ARGS))
def test_render_builds_the_overlay(
    overlay: str, built: dict[str, list[dict[str, Any]]], capsys: pytest.CaptureFixture[str]
) -> None:
    ours = by_identity(rendered([*OVERLAY_ARGS[overlay], "--with-runtime"], capsys))
    theirs = by_identity(built[overlay])
    skipped = {(kind, name) for (o, kind, name) in NOT_RENDERED if o == overlay}
    assert skipped <= set(theirs), "NOT_RENDERED names an object the overlay no longer has"
    assert set(ours) == set(theirs) - skipped
    found = {
        (overlay, kind, name, path)
        for (kind, name), obj in ours.items()
        for path in differences(obj, theirs[(kind, name)])
    }
    assert found == {key for key in DIFFERENCES if key[0] == overlay}


def test_render_triggers_are_the_shipped_ones(capsys: pytest.CaptureFixture[str]) -> None:
    """`--triggers` for the overlays' InferenceService prints eventing/knative's Triggers, field for field."""
    ours = by_identity(rendered([*OVERLAY_ARGS["gpu-1x"], "--triggers"], capsys))
    theirs = by_identity(kustomize(ROOT / "eventing" / "knative"))
    triggers = {key for key in theirs if key[0] == "Trigger"}
    assert len(triggers) == 4
    assert {key for key in ours if key[0] == "Trigger"} == triggers
    for key in triggers:
        assert differences(ours[key], theirs[key]) == [], key

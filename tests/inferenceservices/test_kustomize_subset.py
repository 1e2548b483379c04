"""inferenceservices.kustomize (what render builds from) against the real `kubectl kustomize`."""

from __future__ import annotations

from typing import Any

import pytest

from inferenceservices import kustomize

from .conftest import ROOT, TARGETS
from .conftest import kustomize as kubectl_kustomize


def identified(objs: list[dict[str, Any]]) -> dict[tuple[str, str, str], dict[str, Any]]:
    return {(o["apiVersion"], o["kind"], o["metadata"]["name"]): o for o in objs}


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_builds_what_kubectl_builds(built: dict[str, list[dict[str, Any]]], target: str) -> None:
    directory = TARGETS[target].relative_to(ROOT / "inferenceservices").as_posix()
    ours = kustomize.build(directory)
    assert len(ours) == len(built[target])
    assert identified(ours) == identified(built[target])


def test_builds_the_knative_manifests_from_the_eventing_package() -> None:
    ours = kustomize.build("knative", package="eventing")
    assert identified(ours) == identified(kubectl_kustomize(ROOT / "eventing" / "knative"))


def test_an_unsupported_kustomize_feature_fails_loudly() -> None:
    # monitoring/ uses configMapGenerator: refusing it beats building something kubectl would not.
    with pytest.raises(kustomize.KustomizeError, match=r"unsupported fields \['configMapGenerator'\]"):
        kustomize.build("monitoring")


def test_merge_patch_merges_maps_replaces_lists_and_deletes_nulls() -> None:
    target = {"a": {"b": 1, "c": [1, 2]}, "d": "x", "keep": True}
    patch = {"a": {"c": [3], "e": 2}, "d": None}
    assert kustomize.merge_patch(target, patch) == {"a": {"b": 1, "c": [3], "e": 2}, "keep": True}
    assert target == {"a": {"b": 1, "c": [1, 2]}, "d": "x", "keep": True}  # the target is not modified
    with pytest.raises(kustomize.KustomizeError, match="unsupported patch directive"):
        kustomize.merge_patch(target, {"a": {"$patch": "delete"}})


def test_resources_may_not_leave_the_package() -> None:
    with pytest.raises(kustomize.KustomizeError, match="leaves the package"):
        kustomize._join("overlays/gpu-1x", "../../../eventing/knative")

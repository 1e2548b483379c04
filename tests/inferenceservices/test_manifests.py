"""The validator bites: typos, wrong types, bad enums and bad names are rejected, not pruned."""

from __future__ import annotations

import copy
import re
from typing import Any

import pytest

from inferenceservices import manifests

from .conftest import CRD_DIR, one


@pytest.fixture
def isvc(built: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    return copy.deepcopy(one(built["gpu-4x"], "InferenceService"))


def test_vendored_crds_are_the_ones_sources_names() -> None:
    vendored = sorted(p.name for p in manifests.CRD_DIR.glob("*.yaml"))
    assert vendored == sorted(manifests.CRD_FILES)
    sources = (manifests.CRD_DIR / "SOURCES.md").read_text()
    assert sorted(re.findall(r"^- (\S+\.yaml):", sources, re.M)) == vendored
    for line in re.findall(r"^- \S+\.yaml:.*$", sources, re.M):  # every file pinned to an upstream commit
        assert re.search(r"repo \S+/\S+, path \S+, commit [0-9a-f]{40}", line), line


def test_served_schemas_are_loaded() -> None:
    schemas = manifests.load_schemas(CRD_DIR)
    for key in [
        ("serving.kserve.io/v1beta1", "InferenceService"),
        ("serving.kserve.io/v1alpha1", "ClusterServingRuntime"),
        ("serving.kserve.io/v1alpha1", "ServingRuntime"),
        ("serving.knative.dev/v1", "Service"),
        ("eventing.knative.dev/v1", "Broker"),
        ("eventing.knative.dev/v1", "Trigger"),
    ]:
        assert schemas[key]["type"] == "object", key


def test_typo_field_is_rejected_with_a_hint(isvc: dict[str, Any]) -> None:
    pred = isvc["spec"]["predictor"]
    pred["minReplica"] = pred.pop("minReplicas")
    errors = manifests.validate(isvc, CRD_DIR)
    assert errors == [
        "InferenceService/llm: spec.predictor.minReplica: unknown field (did you mean 'minReplicas'?)"
    ]


def test_nested_typo_in_a_list_item_is_rejected(isvc: dict[str, Any]) -> None:
    isvc["spec"]["predictor"]["model"]["volumeMounts"][0]["mountpath"] = "/dev/shm"
    (error,) = manifests.validate(isvc, CRD_DIR)
    assert "spec.predictor.model.volumeMounts[0].mountpath: unknown field" in error


def test_wrong_type_and_enum_are_rejected(isvc: dict[str, Any]) -> None:
    isvc["spec"]["predictor"]["minReplicas"] = "zero"
    isvc["spec"]["predictor"]["scaleMetric"] = "qps"
    errors = "\n".join(manifests.validate(isvc, CRD_DIR))
    assert "spec.predictor.minReplicas: 'zero' is not of type 'integer'" in errors
    assert "spec.predictor.scaleMetric: 'qps' is not one of" in errors


def test_bad_quantity_is_rejected(isvc: dict[str, Any]) -> None:
    isvc["spec"]["predictor"]["model"]["resources"]["limits"]["memory"] = "64 GB"
    (error,) = manifests.validate(isvc, CRD_DIR)
    assert "resources.limits.memory: '64 GB' does not match" in error


def test_missing_required_field_is_rejected(built: dict[str, list[dict[str, Any]]]) -> None:
    runtime = copy.deepcopy(one(built["base"], "ClusterServingRuntime"))
    del runtime["spec"]["containers"][0]["name"]
    (error,) = manifests.validate(runtime, CRD_DIR)
    assert "spec.containers[0]: 'name' is a required property" in error


@pytest.mark.parametrize("name", ["Llm", "llm_7b", "7b-llm", "llm-", "x" * 64])
def test_invalid_names_are_rejected(isvc: dict[str, Any], name: str) -> None:
    isvc["metadata"]["name"] = name
    errors = manifests.validate(isvc, CRD_DIR)
    assert len(errors) == 1 and "metadata.name:" in errors[0]


def test_metadata_typos_and_non_string_annotations_are_rejected(isvc: dict[str, Any]) -> None:
    isvc["metadata"]["annotation"] = {}
    isvc["metadata"]["annotations"]["autoscaling.knative.dev/initial-scale"] = 1
    errors = "\n".join(manifests.validate(isvc, CRD_DIR))
    assert "metadata.annotation: unknown field (did you mean 'annotations'?)" in errors
    assert "initial-scale: value must be a string, got int" in errors


def test_unknown_kind_is_rejected() -> None:
    obj = {"apiVersion": "serving.kserve.io/v1alpha9", "kind": "InferenceService", "metadata": {"name": "x"}}
    assert manifests.validate(obj, CRD_DIR) == [
        "InferenceService/x: no served schema for apiVersion='serving.kserve.io/v1alpha9' kind='InferenceService'"
    ]


def test_preserve_unknown_fields_is_honoured() -> None:
    # Trigger.spec.delivery preserves unknown fields (Knative's experimental `timeout` lives there), but a
    # declared sub-object such as deadLetterSink stays strict.
    trigger = {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Trigger",
        "metadata": {"name": "t"},
        "spec": {
            "broker": "default",
            "subscriber": {"uri": "http://example.invalid/events"},
            "delivery": {"timeout": "PT10S", "deadLetterSink": {"url": "http://dls.invalid"}},
        },
    }
    (error,) = manifests.validate(trigger, CRD_DIR)
    assert "spec.delivery.deadLetterSink.url: unknown field (did you mean 'uri'?)" in error


def test_validate_all_raises_with_every_problem(isvc: dict[str, Any]) -> None:
    bad = copy.deepcopy(isvc)
    bad["spec"]["predictor"]["maxReplica"] = 2
    manifests.validate_all([isvc])  # the good one passes
    with pytest.raises(manifests.ManifestError) as exc:
        manifests.validate_all([isvc, bad])
    assert exc.value.errors == [
        "InferenceService/llm: spec.predictor.maxReplica: unknown field (did you mean 'maxReplicas'?)"
    ]

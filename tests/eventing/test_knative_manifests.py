"""eventing/knative/*.yaml against the Knative/KServe CRDs in ../shared/crds (SinkBinding by hand)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from predictors.manifests import validate

from .fakes import SHARED

KNATIVE = Path(__file__).resolve().parents[2] / "eventing" / "knative"
CRDS = SHARED / "crds"
FILES = ["broker-kafka.yaml", "broker-dev.yaml", "dead-letters.yaml", "triggers.yaml", "sinkbinding.yaml"]
ISO_DURATION = re.compile(r"^PT(\d+(\.\d+)?[HMS])+$")


def docs(name: str) -> list[dict]:
    return [d for d in yaml.safe_load_all((KNATIVE / name).read_text()) if d]


def test_kustomization_lists_existing_files() -> None:
    kust = yaml.safe_load((KNATIVE / "kustomization.yaml").read_text())
    assert all((KNATIVE / r).exists() for r in kust["resources"])
    assert "triggers.yaml" in kust["resources"] and "sinkbinding.yaml" in kust["resources"]


@pytest.mark.parametrize("name", [f for f in FILES if f != "sinkbinding.yaml"])
def test_against_crds(name: str) -> None:
    for obj in docs(name):
        assert validate(obj, CRDS) == []


def test_brokers() -> None:
    classes = {docs(f)[0]["metadata"]["annotations"]["eventing.knative.dev/broker.class"]
               for f in ("broker-kafka.yaml", "broker-dev.yaml")}  # fmt: skip
    assert classes == {"Kafka", "MTChannelBasedBroker"}


def test_triggers_cover_every_consumed_type() -> None:
    from eventing import catalog

    triggers = docs("triggers.yaml")
    types = {t["spec"]["filter"]["attributes"]["type"] for t in triggers}
    assert types == {f"dev.evllm.{name}" for name in catalog.CONSUMED}
    for t in triggers:
        spec = t["spec"]
        assert spec["broker"] == "evllm" and spec["filter"]["attributes"]["model"] == "demo"
        assert spec["subscriber"]["ref"] == {
            "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "name": "evllm"}  # fmt: skip
        assert spec["subscriber"]["uri"] == "/events"
        d = spec["delivery"]
        assert d["retry"] >= 1 and d["backoffPolicy"] == "exponential"
        assert ISO_DURATION.match(d["backoffDelay"]) and ISO_DURATION.match(d["timeout"])
        assert d["deadLetterSink"]["ref"]["name"] == "evllm-dead-letters"


def test_sinkbinding_shape() -> None:
    (sb,) = docs("sinkbinding.yaml")
    assert sb["apiVersion"] == "sources.knative.dev/v1" and sb["kind"] == "SinkBinding"
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", sb["metadata"]["name"])
    assert set(sb) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sb["spec"]) == {"subject", "sink"}
    subject = sb["spec"]["subject"]
    assert subject["apiVersion"] == "apps/v1" and subject["kind"] == "Deployment"
    assert set(subject) == {"apiVersion", "kind", "selector"}
    assert subject["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": "evllm"}
    assert sb["spec"]["sink"] == {
        "ref": {"apiVersion": "eventing.knative.dev/v1", "kind": "Broker", "name": "evllm"}
    }


def test_the_validation_bites() -> None:
    (trigger, *_) = docs("triggers.yaml")
    trigger["spec"]["delivery"]["retry"] = "five"
    trigger["metadata"]["name"] = "Bad_Name"
    assert len(validate(trigger, CRDS)) == 2

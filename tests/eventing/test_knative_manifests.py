"""eventing/knative/*.yaml against the vendored Knative/KServe CRDs (SinkBinding by hand), and aimed at
the InferenceService that inferenceservices/overlays deploy."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from inferenceservices import kustomize
from inferenceservices.manifests import CRD_DIR as CRDS
from inferenceservices.manifests import validate

ROOT = Path(__file__).resolve().parents[2]
KNATIVE = ROOT / "eventing" / "knative"
OVERLAYS = sorted(p.name for p in (ROOT / "inferenceservices" / "overlays").iterdir() if p.is_dir())
FILES = [
    "broker-kafka.yaml",
    "broker-dev.yaml",
    "dead-letters.yaml",
    "triggers.yaml",
    "sinkbinding.yaml",
    "storage-triggers.yaml",
]
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


def deployed_inference_service() -> dict:
    """The one InferenceService every overlay deploys (same name in all of them). spot-batch adds a second
    one, its spot pool, which its own Trigger targets (tests/inferenceservices/test_kustomize.py)."""
    objs = [o for overlay in OVERLAYS for o in kustomize.build(f"overlays/{overlay}")]
    isvcs = [o for o in objs if o["kind"] == "InferenceService"]
    spot = [o for o in isvcs if o["metadata"]["name"] == "llm-spot"]
    assert len(spot) == 1
    isvcs = [o for o in isvcs if o not in spot]
    assert len(isvcs) == len(OVERLAYS) >= 4
    assert len({i["metadata"]["name"] for i in isvcs}) == 1
    assert len({i["spec"]["predictor"]["timeout"] for i in isvcs}) == 1
    return isvcs[0]


def test_triggers_cover_every_consumed_type() -> None:
    from eventing import catalog

    triggers = docs("triggers.yaml")
    types = {t["spec"]["filter"]["attributes"]["type"] for t in triggers}
    assert types == {f"dev.evllm.{name}" for name in catalog.CONSUMED}
    for t in triggers:
        spec = t["spec"]
        d = spec["delivery"]
        assert spec["subscriber"]["uri"] == "/events"
        assert d["retry"] >= 1 and d["backoffPolicy"] == "exponential"
        assert ISO_DURATION.match(d["backoffDelay"]) and ISO_DURATION.match(d["timeout"])


def test_triggers_and_sinkbinding_target_what_is_deployed() -> None:
    """Broker, dead-letter Service and InferenceService: every name is one these manifests or the overlays
    create, so `kubectl apply -k eventing/knative` next to any overlay connects without editing."""
    isvc = deployed_inference_service()
    name = isvc["metadata"]["name"]
    brokers = {docs(f)[0]["metadata"]["name"] for f in ("broker-kafka.yaml", "broker-dev.yaml")}
    (dead_letters,) = docs("dead-letters.yaml")
    dead_letter_ref = {
        "apiVersion": "serving.knative.dev/v1",
        "kind": "Service",
        "name": "evllm-dead-letters",
    }
    assert dead_letters["metadata"]["name"] == dead_letter_ref["name"]
    for broker in ("broker-kafka.yaml", "broker-dev.yaml"):
        assert docs(broker)[0]["spec"]["delivery"]["deadLetterSink"]["ref"] == dead_letter_ref
    assert len(brokers) == 1  # dev and Kafka brokers are interchangeable
    for t in docs("triggers.yaml"):
        spec = t["spec"]
        event = spec["filter"]["attributes"]["type"].removeprefix("dev.evllm.")
        assert t["metadata"]["name"] == f"{name}-{event.replace('.', '-')}"
        assert spec["broker"] in brokers
        # The runtime serves the model under the InferenceService's name (--model_name={{.Name}}).
        assert spec["filter"]["attributes"]["model"] == name
        assert spec["subscriber"]["ref"] == {
            "apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "name": name}  # fmt: skip
        assert spec["delivery"]["deadLetterSink"]["ref"] == dead_letter_ref
        # Each attempt may wait through a cold start, as long as the InferenceService itself waits.
        assert spec["delivery"]["timeout"] == f"PT{isvc['spec']['predictor']['timeout']}S"
    (sb,) = docs("sinkbinding.yaml")
    assert sb["spec"]["subject"]["selector"]["matchLabels"] == {"serving.kserve.io/inferenceservice": name}
    assert sb["spec"]["sink"]["ref"]["name"] in brokers


def test_sinkbinding_shape() -> None:
    (sb,) = docs("sinkbinding.yaml")
    assert sb["apiVersion"] == "sources.knative.dev/v1" and sb["kind"] == "SinkBinding"
    assert re.match(r"^[a-z]([-a-z0-9]*[a-z0-9])?$", sb["metadata"]["name"])
    assert set(sb) == {"apiVersion", "kind", "metadata", "spec"}
    assert set(sb["spec"]) == {"subject", "sink"}
    subject = sb["spec"]["subject"]
    assert subject["apiVersion"] == "apps/v1" and subject["kind"] == "Deployment"
    assert set(subject) == {"apiVersion", "kind", "selector"}
    assert set(subject["selector"]) == {"matchLabels"}
    assert set(sb["spec"]["sink"]) == {"ref"}
    assert set(sb["spec"]["sink"]["ref"]) == {"apiVersion", "kind", "name"}
    assert sb["spec"]["sink"]["ref"]["kind"] == "Broker"


def test_the_validation_bites() -> None:
    (trigger, *_) = docs("triggers.yaml")
    trigger["spec"]["delivery"]["retry"] = "five"
    trigger["metadata"]["name"] = "Bad_Name"
    assert len(validate(trigger, CRDS)) == 2


def _filter_values(expr: dict, kind: str, attribute: str) -> list[str]:
    """Every value of ``attribute`` that ``kind`` (exact, prefix, ...) filters on, nested any/all too."""
    out = [expr[kind][attribute]] if attribute in expr.get(kind, {}) else []
    for nested in expr.get("any", []) + expr.get("all", []):
        out += _filter_values(nested, kind, attribute)
    return out


def test_storage_triggers_route_only_accepted_events_to_the_deployed_service() -> None:
    """The example Triggers for jobs from storage events: every type they pass is one evllm takes
    (eventing/storage_events.py), and they deliver like the other Triggers."""
    from eventing import storage_events

    isvc = deployed_inference_service()
    (batch_submitted,) = [t for t in docs("triggers.yaml") if t["metadata"]["name"].endswith("submitted")]
    triggers = docs("storage-triggers.yaml")
    assert (
        "storage-triggers.yaml"
        not in yaml.safe_load((KNATIVE / "kustomization.yaml").read_text())["resources"]
    )
    seen = set()
    for t in triggers:
        spec = t["spec"]
        filters = spec["filters"]
        exact = [v for f in filters for v in _filter_values(f, "exact", "type")]
        prefixes = [v for f in filters for v in _filter_values(f, "prefix", "type")]
        assert exact or prefixes
        for value in exact:
            assert storage_events.is_storage_event(value), value
        for value in prefixes:
            assert storage_events.is_storage_event(value + "Put"), value
        seen.update(exact + [p + "Put" for p in prefixes])
        assert spec["subscriber"] == batch_submitted["spec"]["subscriber"]
        assert spec["subscriber"]["ref"]["name"] == isvc["metadata"]["name"]
        assert spec["delivery"] == batch_submitted["spec"]["delivery"]
    # Each kind of source the handler accepts has its Trigger.
    assert {"com.amazonaws.s3.ObjectCreated:Put", "com.amazon.s3.objectcreated", "dev.knative.kafka.event",
            "google.cloud.storage.object.v1.finalized"} <= seen  # fmt: skip

"""`evllm render`: valid output, every flag patches its knob, and one clear line for every bad input.

That render without flags *is* each overlay is test_render_vs_kustomize.py.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from typing import Any

import pytest

from inferenceservices import manifests, render

from .conftest import CRD_DIR, ROOT, one


def run_render(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "inferenceservices.render", *argv],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize("gpus", [0, 1, 2, 4, 8])
def test_render_validates(gpus: int) -> None:
    objs = render.render("llm", "hf://Qwen/Qwen2.5-7B-Instruct", gpus=gpus, triggers=True, with_runtime=True)
    assert [o["kind"] for o in objs] == [
        "ClusterServingRuntime",
        "InferenceService",
        "Trigger",
        "Trigger",
        "Trigger",
        "Trigger",
    ]
    for obj in objs:
        assert manifests.validate(obj, CRD_DIR) == []
    model = one(objs, "InferenceService")["spec"]["predictor"]["model"]
    args = model["args"]
    if gpus:
        assert model["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
        assert model["resources"]["requests"] == model["resources"]["limits"]
        assert f"--tensor-parallel-size={gpus}" in args
        assert "runtimeVersion" not in model
    else:
        assert "nvidia.com/gpu" not in model["resources"]["limits"]
        assert not any(a.startswith("--tensor-parallel-size") for a in args)
        assert model["runtimeVersion"] == "0.1.0-cpu"


def test_cluster_serving_runtime_matches_the_base(built: dict[str, list[dict[str, Any]]]) -> None:
    runtime = one(built["base"], "ClusterServingRuntime")
    assert render.cluster_serving_runtime() == runtime
    assert runtime["spec"]["containers"][0]["image"] == f"{render.IMAGE}:{render.IMAGE_VERSION}"


def test_trigger_flags_patch_every_trigger() -> None:
    objs = render.render(
        "qwen-7b",
        "s3://models/qwen",
        gpus=1,
        triggers=True,
        broker="events",
        events_prefix="com.example.llm",
        namespace="ml",
        timeout=300,
        retry=4,
        backoff_delay="PT2S",
        dead_letter_sink="http://dls.ml.svc.cluster.local",
    )
    triggers = [o for o in objs if o["kind"] == "Trigger"]
    assert sorted(t["metadata"]["name"] for t in triggers) == [
        "qwen-7b-batch-cancel",
        "qwen-7b-batch-chunk",
        "qwen-7b-batch-submitted",
        "qwen-7b-inference-request",
    ]
    types = sorted(t["spec"]["filter"]["attributes"]["type"] for t in triggers)
    assert types == [
        "com.example.llm.batch.cancel",
        "com.example.llm.batch.chunk",
        "com.example.llm.batch.submitted",
        "com.example.llm.inference.request",
    ]
    for t in triggers:
        spec = t["spec"]
        assert t["metadata"]["namespace"] == "ml"
        assert spec["broker"] == "events"
        assert spec["filter"]["attributes"]["model"] == "qwen-7b"
        assert spec["subscriber"] == {
            "ref": {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "name": "qwen-7b"},
            "uri": "/events",
        }
        assert spec["delivery"] == {
            "retry": 4,
            "backoffPolicy": "exponential",
            "backoffDelay": "PT2S",
            "timeout": "PT300S",  # always the InferenceService's timeout
            "deadLetterSink": {"uri": "http://dls.ml.svc.cluster.local"},
        }


def test_trigger_defaults_are_the_shipped_ones() -> None:
    """Without trigger flags: eventing/knative's Broker, dead-letter Service and per-type delivery."""
    triggers = {
        t["spec"]["filter"]["attributes"]["type"]: t
        for t in render.render("a", "hf://o/m", triggers=True, dead_letter_sink="dls")
        if t["kind"] == "Trigger"
    }
    assert {t: d["spec"]["delivery"]["retry"] for t, d in triggers.items()} == {
        "dev.evllm.inference.request": 3,
        "dev.evllm.batch.submitted": 5,
        "dev.evllm.batch.chunk": 8,
        "dev.evllm.batch.cancel": 5,
    }
    for t in triggers.values():
        assert t["spec"]["broker"] == "evllm"
        assert t["spec"]["delivery"]["backoffDelay"] == "PT0.5S"
        assert t["spec"]["delivery"]["timeout"] == "PT600S"
        # A name without "://" is a Knative Service in the Trigger's namespace.
        assert t["spec"]["delivery"]["deadLetterSink"] == {
            "ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "dls"}
        }


def test_predictor_flags_patch_their_knobs_only() -> None:
    (isvc,) = render.render(
        "llm",
        "gs://bucket/model",
        gpus=1,
        min_replicas=1,
        max_replicas=3,
        scale_metric="rps",
        scale_target=10,
        container_concurrency=0,
        timeout=120,
        cpu="6",
        memory="20Gi",
        progress_deadline="45m",
        max_model_len=4096,
        engine_args=["--dtype=bfloat16", "--quantization=awq", "--enforce-eager"],
    )
    pred = isvc["spec"]["predictor"]
    assert {k: pred[k] for k in ("minReplicas", "maxReplicas", "scaleMetric", "scaleTarget")} == {
        "minReplicas": 1,
        "maxReplicas": 3,
        "scaleMetric": "rps",
        "scaleTarget": 10,
    }
    assert pred["containerConcurrency"] == 0 and pred["timeout"] == 120
    assert isvc["metadata"]["annotations"]["serving.knative.dev/progress-deadline"] == "45m"
    model = pred["model"]
    assert model["storageUri"] == "gs://bucket/model"
    assert (
        model["resources"]["requests"]
        == model["resources"]["limits"]
        == {
            "cpu": "6",
            "memory": "20Gi",
            "nvidia.com/gpu": "1",
        }
    )
    # A flag the overlay already has is replaced where it stands; new ones are appended in order.
    assert model["args"] == [
        "--dtype=bfloat16",
        "--max-model-len=4096",
        "--gpu-memory-utilization=0.90",
        "--enable-prefix-caching",
        "--tensor-parallel-size=1",
        "--quantization=awq",
        "--enforce-eager",
    ]


@pytest.mark.parametrize(
    ("gpus", "cpu", "memory"),
    [(1, "8", "32Gi"), (2, "8", "32Gi"), (3, "12", "48Gi"), (4, "16", "64Gi"), (8, "32", "128Gi")],
)
def test_gpu_sizing_scales_from_the_overlays(gpus: int, cpu: str, memory: str) -> None:
    """gpu-4x's per-GPU share (4 CPU, 16Gi) times the count, never below gpu-1x's 8 CPU / 32Gi."""
    (isvc,) = render.render("llm", "hf://o/m", gpus=gpus)
    pred = isvc["spec"]["predictor"]
    assert pred["model"]["resources"]["limits"] == {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)}
    # Context length and deadline stay gpu-1x's and base's: safe for any model whatever the GPU count.
    assert "--max-model-len=8192" in pred["model"]["args"]
    assert isvc["metadata"]["annotations"]["serving.knative.dev/progress-deadline"] == "30m"
    assert ("volumes" in pred) == (gpus > 1)


def test_cli_prints_yaml_that_validates() -> None:
    out = run_render(
        "llm", "pvc://model-cache/qwen", "--gpus", "4", "--triggers", "--with-runtime", "--max-replicas", "3",
        "--engine-arg=--quantization=awq", "--namespace", "ml",
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stderr == ""
    objs = manifests.load_documents(out.stdout)
    assert [o["kind"] for o in objs] == [
        "ClusterServingRuntime",
        "InferenceService",
        "Trigger",
        "Trigger",
        "Trigger",
        "Trigger",
    ]
    manifests.validate_all(objs, CRD_DIR)
    pred = objs[1]["spec"]["predictor"]
    assert pred["maxReplicas"] == 3
    assert "--quantization=awq" in pred["model"]["args"]
    assert pred["model"]["storageUri"] == "pvc://model-cache/qwen"


def test_add_parser_registers_the_render_subcommand(capsys: pytest.CaptureFixture[str]) -> None:
    """What `evllm render` is wired to: a `render` subparser whose `func` runs the command."""
    parser = argparse.ArgumentParser(prog="evllm")
    render.add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["render", "llm", "hf://o/m", "--gpus", "1"])
    assert args.func is render.run
    assert args.func(args) == 0
    (isvc,) = manifests.load_documents(capsys.readouterr().out)
    assert isvc["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


def test_a_manifest_the_crd_rejects_is_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """An object our checks let through but the CRD schema rejects (say, a typo in an overlay file) is
    still one line and exit 2, with nothing on stdout."""
    shipped = render.inference_service

    def with_typo(*args: Any, **kwargs: Any) -> dict[str, Any]:
        isvc = shipped(*args, **kwargs)
        isvc["spec"]["predictor"]["minReplica"] = 0
        return isvc

    monkeypatch.setattr(render, "inference_service", with_typo)
    assert render.main(["llm", "hf://o/m"]) == 2
    out = capsys.readouterr()
    assert out.out == ""
    assert out.err == (
        "evllm render: error: invalid manifest: InferenceService/llm: spec.predictor.minReplica: "
        "unknown field (did you mean 'minReplicas'?)\n"
    )


BAD_INPUTS = [
    (["--gpus", "-1"], "--gpus must be 0 (CPU) or more, got -1"),
    (["--min-replicas", "3", "--max-replicas", "2"], "--min-replicas (3) is greater than --max-replicas (2)"),
    (["--min-replicas", "-1"], "--min-replicas must be 0 or more"),
    (["--max-replicas", "0"], "--max-replicas must be at least 1"),
    (["--scale-metric", "qps"], "unknown scale metric 'qps': use one of concurrency, rps, cpu, memory"),
    (["--scale-metric", "cpu"], "scale metric 'cpu' uses the HPA autoscaler, which cannot scale to zero"),
    (["--scale-target", "0"], "--scale-target must be at least 1"),
    (["--container-concurrency", "-2"], "--container-concurrency must be 0 (unlimited) or more"),
    (["--timeout", "0"], "--timeout must be at least 1 second"),
    (["--memory", "64 GB"], "--memory '64 GB' is not a Kubernetes quantity"),
    (["--namespace", "My_NS"], "invalid namespace 'My_NS'"),
    (["--max-model-len", "0"], "--max-model-len must be at least 1"),
    (["--engine-arg=quantization=awq"], "engine flag 'quantization=awq' must start with '--'"),
    (["--triggers", "--events_prefix", "Dev Evllm"], "invalid events prefix 'Dev Evllm'"),
    (["--triggers", "--broker", "Default"], "invalid broker name 'Default'"),
    (["--triggers", "--retry", "-1"], "--retry must be 0 or more"),
    (["--triggers", "--backoff-delay", "2s"], "--backoff-delay '2s' is not an ISO-8601 duration"),
    (["--progress-deadline", "30 minutes"], "--progress-deadline '30 minutes' is not a duration"),
    (["--gpus", "0", "--min-replicas", "2"], "--min-replicas (2) is greater than --max-replicas (1)"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUTS, ids=[" ".join(e) for e, _ in BAD_INPUTS])
def test_bad_input_is_one_clear_line(extra: list[str], message: str) -> None:
    out = run_render("llm", "hf://Qwen/Qwen2.5-7B-Instruct", *extra)
    assert out.returncode == 2
    assert out.stdout == ""  # nothing half-printed for kubectl to apply
    assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert out.stderr.startswith("evllm render: error: ") and message in out.stderr


@pytest.mark.parametrize(
    ("name", "uri", "message"),
    [
        ("Llama_3", "hf://o/m", "invalid name: 'Llama_3' is not a valid DNS-1035 label"),
        ("3-llama", "hf://o/m", "invalid name: '3-llama' is not a valid DNS-1035 label"),
        ("x" * 64, "hf://o/m", "is longer than 63 characters"),
        ("llm", "ftp://host/model", "storage URI scheme 'ftp' is not supported"),
        ("llm", "/models/qwen", "storage URI '/models/qwen' has no scheme"),
        ("llm", "hf://qwen-only", "must look like hf://<org>/<model>"),
        ("llm", "pvc://claim-only", "must look like pvc://<claim>/<path>"),
    ],
)
def test_bad_name_or_uri_is_one_clear_line(name: str, uri: str, message: str) -> None:
    out = run_render(name, uri)
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.count("\n") == 1 and message in out.stderr


def test_trigger_names_must_fit() -> None:
    with pytest.raises(render.RenderError, match="too long for its Trigger names"):
        render.render("a" * 50, "hf://o/m", triggers=True)
    assert render.render("a" * 50, "hf://o/m")  # fine without Triggers


def test_argparse_errors_exit_2_without_traceback() -> None:
    out = run_render("llm", "hf://o/m", "--gpus", "four")
    assert out.returncode == 2 and out.stdout == ""
    assert "argument --gpus: invalid int value: 'four'" in out.stderr and "Traceback" not in out.stderr


def test_shipped_events_prefix_is_the_predictors_default() -> None:
    """render renames event types by swapping this prefix: it must be the one triggers.yaml and the
    predictor (--events_prefix) use, or a rendered Trigger would filter on types nobody sends."""
    from eventing import config

    assert render.SHIPPED_EVENTS_PREFIX == config.DEFAULT_PREFIX

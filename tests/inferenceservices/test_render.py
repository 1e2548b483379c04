"""`evllm render`: valid output that matches the overlays, and one clear line for every bad input."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from predictors import manifests, render

from .conftest import CRD_DIR, ROOT, one


def run_render(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "predictors.render", *argv],
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


def test_render_matches_the_overlays(built: dict[str, list[dict[str, Any]]]) -> None:
    """render() and inferenceservices/ encode the same knobs: a change to one must reach the other."""
    base_isvc = one(built["base"], "InferenceService")
    for target, gpus, uri in [
        ("gpu-1x", 1, "hf://Qwen/Qwen2.5-7B-Instruct"),
        ("gpu-4x", 4, "hf://Qwen/Qwen2.5-72B-Instruct"),
        ("cpu-dev", 0, "hf://Qwen/Qwen2.5-0.5B-Instruct"),
    ]:
        overlay = one(built[target], "InferenceService")
        pred = overlay["spec"]["predictor"]
        (rendered,) = render.render(
            "llm",
            uri,
            gpus=gpus,
            max_replicas=pred["maxReplicas"],
            max_model_len=int(next(a for a in pred["model"]["args"] if "max-model-len" in a).split("=")[1]),
            progress_deadline=overlay["metadata"]["annotations"]["serving.knative.dev/progress-deadline"],
        )
        assert rendered["metadata"]["annotations"] == overlay["metadata"]["annotations"], target
        assert rendered["metadata"]["labels"] == overlay["metadata"]["labels"], target
        rpred = rendered["spec"]["predictor"]
        for key in (
            "minReplicas",
            "maxReplicas",
            "scaleMetric",
            "scaleTarget",
            "containerConcurrency",
            "timeout",
        ):
            assert rpred[key] == pred[key], (target, key)
        for key in (
            "modelFormat",
            "runtime",
            "storageUri",
            "resources",
            "runtimeVersion",
            "env",
            "volumeMounts",
        ):
            assert rpred["model"].get(key) == pred["model"].get(key), (target, key)
        assert sorted(rpred["model"]["args"]) == sorted(pred["model"]["args"]), target
        assert rpred.get("volumes") == pred.get("volumes"), target
    # The base's own defaults are GPU defaults too.
    assert base_isvc["spec"]["predictor"]["scaleTarget"] == 32


def test_cluster_serving_runtime_matches_the_base(built: dict[str, list[dict[str, Any]]]) -> None:
    assert render.cluster_serving_runtime() == one(built["base"], "ClusterServingRuntime")


def test_triggers_route_each_event_type_of_this_model_to_events() -> None:
    objs = render.render(
        "qwen-7b",
        "s3://models/qwen",
        gpus=1,
        triggers=True,
        broker="events",
        events_prefix="com.example.llm",
        namespace="ml",
        timeout=300,
        dead_letter_sink="http://dls.ml.svc.cluster.local",
    )
    triggers = [o for o in objs if o["kind"] == "Trigger"]
    types = sorted(t["spec"]["filter"]["attributes"]["type"] for t in triggers)
    assert types == [
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
            "retry": 5,
            "backoffPolicy": "exponential",
            "backoffDelay": "PT2S",
            "timeout": "PT300S",
            "deadLetterSink": {"uri": "http://dls.ml.svc.cluster.local"},
        }
    sink = render.render("a", "hf://o/m", triggers=True)[1]["spec"]["delivery"]["deadLetterSink"]
    assert sink == {
        "ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": "evllm-dead-letter"}
    }


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
    ]
    manifests.validate_all(objs, CRD_DIR)
    pred = objs[1]["spec"]["predictor"]
    assert pred["maxReplicas"] == 3
    assert "--quantization=awq" in pred["model"]["args"]
    assert pred["model"]["storageUri"] == "pvc://model-cache/qwen"


def test_evllm_cli_wires_render(capsys: pytest.CaptureFixture[str]) -> None:
    """`evllm render` (predictors.cli) dispatches to the same command."""
    from predictors import cli

    args = cli.build_parser().parse_args(["render", "llm", "hf://o/m", "--gpus", "1"])
    assert args.func is render.run
    assert args.func(args) == 0
    (isvc,) = manifests.load_documents(capsys.readouterr().out)
    assert isvc["spec"]["predictor"]["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"


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
    (["--triggers", "--events-prefix", "Dev Evllm"], "invalid events prefix 'Dev Evllm'"),
    (["--triggers", "--broker", "Default"], "invalid broker name 'Default'"),
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

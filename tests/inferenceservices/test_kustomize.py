"""Every kustomize target builds, validates strictly against the CRDs, and says what the docs say."""

from __future__ import annotations

from typing import Any

import pytest

from inferenceservices import manifests

from .conftest import CRD_DIR, TARGETS, one

GPU_IMAGE = "ghcr.io/evllm/evllm:0.1.0"


def predictor(objs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(objs, "InferenceService")["spec"]["predictor"]


def flags(args: list[str]) -> dict[str, str]:
    """--key=value / --flag -> {key: value or ''}."""
    out = {}
    for arg in args:
        key, _, value = arg.removeprefix("--").partition("=")
        out[key] = value
    return out


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_builds_and_validates(built: dict[str, list[dict[str, Any]]], target: str) -> None:
    objs = built[target]
    kinds = sorted(o["kind"] for o in objs)
    expected = ["ClusterServingRuntime", "InferenceService"]
    if target == "model-cache":
        expected = ["ClusterServingRuntime", "InferenceService", "PersistentVolumeClaim"]
    if target == "grpc":  # the base runtime and its own
        expected = ["ClusterServingRuntime", "ClusterServingRuntime", "InferenceService"]
    assert kinds == expected
    for obj in objs:
        assert manifests.validate(obj, CRD_DIR) == [], obj["kind"]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_scale_to_zero_in_knative_mode(built: dict[str, list[dict[str, Any]]], target: str) -> None:
    isvc = one(built[target], "InferenceService")
    ann = isvc["metadata"]["annotations"]
    pred = isvc["spec"]["predictor"]
    assert ann["serving.kserve.io/deploymentMode"] == "Knative"
    assert pred["minReplicas"] == 0
    assert pred["maxReplicas"] >= 1
    assert pred["scaleMetric"] == "concurrency"
    assert 0 < pred["scaleTarget"] <= pred["containerConcurrency"]
    assert pred["model"]["runtime"] == RUNTIME.get(target, "evllm")
    # Cold-start knobs are present and explicit strings, as Knative's annotations must be.
    for key in (
        "serving.knative.dev/progress-deadline",
        "autoscaling.knative.dev/scale-to-zero-pod-retention-period",
        "autoscaling.knative.dev/scale-down-delay",
        "autoscaling.knative.dev/initial-scale",
    ):
        assert isinstance(ann[key], str) and ann[key], key


def _minutes(duration: str) -> float:
    units = {"s": 1 / 60, "m": 1, "h": 60}
    return float(duration[:-1]) * units[duration[-1]]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_timeouts_survive_a_cold_start(built: dict[str, list[dict[str, Any]]], target: str) -> None:
    isvc = one(built[target], "InferenceService")
    ann = isvc["metadata"]["annotations"]
    # 600 s is both long enough for a request that waits through a cold start and Knative's default
    # max-revision-timeout-seconds (a larger value would be rejected by a default install).
    assert isvc["spec"]["predictor"]["timeout"] == 600
    assert _minutes(ann["serving.knative.dev/progress-deadline"]) >= 10  # Knative's default is 10m
    if target.startswith("gpu"):
        assert _minutes(ann["serving.knative.dev/progress-deadline"]) >= 30
    assert _minutes(ann["autoscaling.knative.dev/scale-to-zero-pod-retention-period"]) == 10
    assert _minutes(ann["autoscaling.knative.dev/scale-down-delay"]) == 5
    assert ann["autoscaling.knative.dev/initial-scale"] == "1"


def test_gpu_4x_sizing(built: dict[str, list[dict[str, Any]]]) -> None:
    pred = predictor(built["gpu-4x"])
    res = pred["model"]["resources"]
    assert res["requests"] == res["limits"] == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "4"}
    assert flags(pred["model"]["args"])["tensor-parallel-size"] == "4"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pred["model"]["volumeMounts"]
    shm = next(v for v in pred["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"]["medium"] == "Memory"


def test_gpu_1x_sizing(built: dict[str, list[dict[str, Any]]]) -> None:
    model = predictor(built["gpu-1x"])["model"]
    res = model["resources"]
    assert res["requests"] == res["limits"]
    assert res["limits"]["nvidia.com/gpu"] == "1"
    assert flags(model["args"])["tensor-parallel-size"] == "1"  # always the GPU count
    assert model["storageUri"].startswith("hf://")


def test_cpu_dev_is_demo_sized_on_the_cpu_image(built: dict[str, list[dict[str, Any]]]) -> None:
    objs = built["cpu-dev"]
    model = predictor(objs)["model"]
    runtime_image = one(objs, "ClusterServingRuntime")["spec"]["containers"][0]["image"]
    # KServe replaces the runtime image's tag with runtimeVersion.
    assert runtime_image.rpartition(":")[0] + ":" + model["runtimeVersion"] == "ghcr.io/evllm/evllm:0.1.0-cpu"
    assert all("nvidia.com/gpu" not in model["resources"][k] for k in ("requests", "limits"))
    assert int(flags(model["args"])["max-model-len"]) <= 4096
    env = {e["name"]: e["value"] for e in model["env"]}
    assert int(env["VLLM_CPU_KVCACHE_SPACE"]) > 0


def test_model_cache_reads_from_the_pvc(built: dict[str, list[dict[str, Any]]]) -> None:
    objs = built["model-cache"]
    pvc = one(objs, "PersistentVolumeClaim")
    uri = predictor(objs)["model"]["storageUri"]
    assert uri.startswith(f"pvc://{pvc['metadata']['name']}/")
    assert predictor(objs)["model"]["resources"]["limits"]["nvidia.com/gpu"] == "1"  # built on gpu-1x


# The grpc overlay ships its own runtime (a gRPC container): test_grpc_overlay.
HTTP_TARGETS = sorted(set(TARGETS) - {"grpc"})
RUNTIME = {"grpc": "evllm-grpc"}


@pytest.mark.parametrize("target", HTTP_TARGETS)
def test_runtime_container(built: dict[str, list[dict[str, Any]]], target: str) -> None:
    rt = one(built[target], "ClusterServingRuntime")
    spec = rt["spec"]
    assert rt["metadata"]["name"] == "evllm"
    assert spec["protocolVersions"] == ["v2", "v1"]
    formats = {f["name"]: f for f in spec["supportedModelFormats"]}
    assert formats["huggingface"]["autoSelect"] and formats["vllm"]["autoSelect"]
    (container,) = spec["containers"]
    assert container["name"] == "kserve-container"  # the name KServe merges InferenceService fields into
    assert container["image"] == GPU_IMAGE
    assert container["command"] == ["python", "-m", "evllm", "serve"]  # the image's ENTRYPOINT
    assert container["args"] == ["--model_name={{.Name}}", "--model_dir=/mnt/models", "--http_port=8080"]
    assert container["ports"] == [{"containerPort": 8080, "name": "http1", "protocol": "TCP"}]
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/models/{{.Name}}/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"]["path"] == "/v2/health/live"


def test_grpc_overlay_routes_grpc_on_one_h2c_port(built: dict[str, list[dict[str, Any]]]) -> None:
    """Knative routes one port per container: the grpc overlay's runtime names it h2c and serves gRPC
    there; the HTTP server moves to 8082 in the pod, where the probes reach it from inside."""
    objs = built["grpc"]
    isvc = one(objs, "InferenceService")
    (rt,) = [
        o for o in objs if o["kind"] == "ClusterServingRuntime" and o["metadata"]["name"] == "evllm-grpc"
    ]
    assert rt["spec"]["protocolVersions"] == ["grpc-v2"]
    assert isvc["spec"]["predictor"]["model"]["protocolVersion"] == "grpc-v2"
    (container,) = rt["spec"]["containers"]
    assert container["ports"] == [{"containerPort": 8080, "name": "h2c", "protocol": "TCP"}]
    assert container["args"][-3:] == ["--http_port=8082", "--enable_grpc=true", "--grpc_port=8080"]
    assert isvc["spec"]["predictor"]["model"]["runtime"] == "evllm-grpc"
    for probe, path in (("readinessProbe", "/v2/health/ready"), ("livenessProbe", "/v2/health/live")):
        assert "httpGet" not in container[probe]
        assert f"http://127.0.0.1:8082{path}" in container[probe]["exec"]["command"][-1]
    # The base (HTTP) runtime comes along unchanged: HTTP overlays keep using it.
    (base,) = [o for o in objs if o["kind"] == "ClusterServingRuntime" and o["metadata"]["name"] == "evllm"]
    assert base == one(built["gpu-1x"], "ClusterServingRuntime")

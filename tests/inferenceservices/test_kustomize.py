"""Every kustomize target builds, validates strictly against the CRDs, and says what the docs say."""

from __future__ import annotations

from typing import Any

import pytest

from inferenceservices import manifests

from .conftest import CRD_DIR, TARGETS, every, one

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
        expected = ["ClusterServingRuntime", "InferenceService", "Job", "PersistentVolumeClaim"]
    if target == "spot-batch":
        expected = ["ClusterServingRuntime", "InferenceService", "InferenceService", "Trigger", "Trigger"]
    if target == "lora":
        expected = ["ClusterServingRuntime", "InferenceService", "Job", "PersistentVolumeClaim", "Trigger"]
    if target == "grpc":  # the base runtime and its own
        expected = ["ClusterServingRuntime", "ClusterServingRuntime", "InferenceService"]
    assert kinds == expected
    for obj in objs:
        assert manifests.validate(obj, CRD_DIR) == [], obj["kind"]


@pytest.mark.parametrize("target", sorted(TARGETS))
def test_scale_to_zero_in_knative_mode(built: dict[str, list[dict[str, Any]]], target: str) -> None:
    for isvc in every(built[target], "InferenceService"):
        check_scale_to_zero(isvc, RUNTIME.get(target, "evllm"))


def check_scale_to_zero(isvc: dict[str, Any], runtime: str = "evllm") -> None:
    ann = isvc["metadata"]["annotations"]
    pred = isvc["spec"]["predictor"]
    assert ann["serving.kserve.io/deploymentMode"] == "Knative"
    assert pred["minReplicas"] == 0
    assert pred["maxReplicas"] >= 1
    assert pred["scaleMetric"] == "concurrency"
    assert 0 < pred["scaleTarget"] <= pred["containerConcurrency"]
    assert pred["model"]["runtime"] == runtime
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
    for isvc in every(built[target], "InferenceService"):
        check_timeouts(target, isvc)


def check_timeouts(target: str, isvc: dict[str, Any]) -> None:
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


def test_lora_serves_adapters_from_the_volume_and_a_uri_and_routes_one(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    objs = built["lora"]
    model = predictor(objs)["model"]
    assert model["storageUri"] == predictor(built["model-cache"])["model"]["storageUri"]
    assert (
        model["args"][: len(predictor(built["gpu-1x"])["model"]["args"])]
        == predictor(built["gpu-1x"])["model"]["args"]
    )  # gpu-1x's engine flags kept, LoRA's after them
    assert "--enable-lora" in model["args"] and flags(model["args"])["max-lora-rank"] == "16"
    modules = dict(
        a.removeprefix("--lora-modules=").split("=", 1) for a in model["args"] if "lora-modules" in a
    )
    assert modules["sql"].startswith("/mnt/models/")  # the model's volume
    assert modules["support"].startswith("s3://")  # downloaded to EVLLM_CACHE_DIR
    assert {e["name"]: e.get("value") for e in model["env"]}["EVLLM_CACHE_DIR"].startswith("/tmp/")
    trigger = one(objs, "Trigger")
    assert trigger["spec"]["filter"]["attributes"] == {"type": "dev.evllm.inference.request", "model": "sql"}
    assert trigger["spec"]["subscriber"]["ref"]["name"] == one(objs, "InferenceService")["metadata"]["name"]
    assert trigger["spec"]["subscriber"]["uri"] == "/events"


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


def test_model_cache_prepares_the_compile_cache_beside_the_weights(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    objs = built["model-cache"]
    pvc_name = one(objs, "PersistentVolumeClaim")["metadata"]["name"]
    model = predictor(objs)["model"]
    claim, _, subpath = model["storageUri"].removeprefix("pvc://").partition("/")
    pod = one(objs, "Job")["spec"]["template"]["spec"]
    (volume,) = pod["volumes"]
    assert claim == pvc_name == volume["persistentVolumeClaim"]["claimName"]
    (prepare,) = pod["containers"]
    (fill,) = pod["initContainers"]
    # Weights and cache land where the predictor's pvc:// mount puts them: <claim>/<subpath> at /mnt/models.
    for container in (prepare, fill):
        assert {"name": volume["name"], "mountPath": "/mnt/models", "subPath": subpath} in container[
            "volumeMounts"
        ]
    cache_dir = {e["name"]: e["value"] for e in prepare["env"]}["EVLLM_CACHE_DIR"]
    assert {e["name"]: e["value"] for e in model["env"]}["EVLLM_CACHE_DIR"] == cache_dir
    assert cache_dir.startswith("/mnt/models/")
    assert prepare["image"] == GPU_IMAGE and prepare["resources"] == model["resources"]  # the same GPU


SPOT_LABELS = {  # the providers' node labels for spot capacity
    "cloud.google.com/gke-spot": "true",
    "eks.amazonaws.com/capacityType": "SPOT",
    "kubernetes.azure.com/scalesetpriority": "spot",
    "karpenter.sh/capacity-type": "spot",
}


def test_spot_pool_takes_batch_chunks_and_on_demand_takes_online_requests(
    built: dict[str, list[dict[str, Any]]],
) -> None:
    objs = built["spot-batch"]
    on_demand, spot = one(objs, "InferenceService", "llm"), one(objs, "InferenceService", "llm-spot")
    assert "affinity" not in on_demand["spec"]["predictor"]
    pred = spot["spec"]["predictor"]
    terms = pred["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    # One term per provider: terms are ORed, the expressions inside one term ANDed.
    assert {(e["key"], tuple(e["values"])) for t in terms for e in t["matchExpressions"]} == {
        (k, (v,)) for k, v in SPOT_LABELS.items()
    }
    assert all(len(t["matchExpressions"]) == 1 for t in terms)
    tolerated = {(t["key"], t.get("value")) for t in pred["tolerations"]}
    assert {
        ("kubernetes.azure.com/scalesetpriority", "spot"),
        ("cloud.google.com/gke-spot", "true"),
    } <= tolerated
    # The same model and engine as the on-demand one, served under the same name.
    od_model, spot_model = on_demand["spec"]["predictor"]["model"], pred["model"]
    assert spot_model["storageUri"] == od_model["storageUri"]
    assert spot_model["args"] == ["--model_name=llm", *od_model["args"]]
    assert spot_model["resources"] == od_model["resources"]
    assert spot_model["readinessProbe"]["httpGet"]["path"] == "/v2/models/llm/ready"
    routes = {
        t["spec"]["filter"]["attributes"]["type"]: t["spec"]["subscriber"]["ref"]["name"]
        for t in every(objs, "Trigger")
    }
    assert routes == {"dev.evllm.inference.request": "llm", "dev.evllm.batch.chunk": "llm-spot"}
    for trigger in every(objs, "Trigger"):
        assert trigger["spec"]["filter"]["attributes"]["model"] == "llm"
        assert trigger["spec"]["delivery"]["timeout"] == f"PT{pred['timeout']}S"


def test_spot_triggers_replace_the_shipped_ones_by_name(built: dict[str, list[dict[str, Any]]]) -> None:
    from .conftest import ROOT, kustomize

    shipped = {
        t["metadata"]["name"]: t for t in kustomize(ROOT / "eventing" / "knative") if t["kind"] == "Trigger"
    }
    for trigger in every(built["spot-batch"], "Trigger"):
        original = shipped[trigger["metadata"]["name"]]  # same name: applying the overlay re-points it
        assert trigger["spec"]["filter"] == original["spec"]["filter"]
        assert trigger["spec"]["delivery"] == original["spec"]["delivery"]


def test_awq_overlay_fits_its_gpu_on_paper(built: dict[str, list[dict[str, Any]]]) -> None:
    """The patch's memory arithmetic, recomputed: weights + KV cache at the configured context fit."""
    model = predictor(built["gpu-1x-awq"])["model"]
    args = flags(model["args"])
    assert model["storageUri"].endswith("-AWQ") and args["quantization"] == "awq_marlin"
    assert args["dtype"] == "float16" and model["resources"]["limits"]["nvidia.com/gpu"] == "1"
    layers, kv_heads, head_dim, vocab, hidden = 64, 8, 128, 152064, 5120  # Qwen2.5-32B config.json
    embeddings = 2 * vocab * hidden * 2  # embed_tokens + lm_head in 16 bits
    int4 = 31.2e9 * (4 + (16 + 4) / 128) / 8  # AWQ group 128: scale (16 bits) + zero (4 bits) per group
    weights = embeddings + int4
    assert 19.0e9 < weights < 19.6e9
    budget = float(args["gpu-memory-utilization"]) * 48e9
    kv_per_token = 2 * layers * kv_heads * head_dim * 2
    kv_tokens = (budget - weights - 3.0e9) // kv_per_token
    assert kv_tokens >= 4 * int(args["max-model-len"])  # 4 full-length sequences, as the comment says


def test_stream_overlay_reads_the_bucket_itself(built: dict[str, list[dict[str, Any]]]) -> None:
    model = predictor(built["gpu-1x-stream"])["model"]
    assert "storageUri" not in model  # no storage-initializer download before the engine starts
    args = flags(model["args"])
    assert args["load-format"] == "runai_streamer" and args["model_dir"].startswith("s3://")
    assert flags(predictor(built["gpu-1x"])["model"]["args"]).items() - args.items() == set()


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

"""`evllm render`: a ready, validated InferenceService (and optionally its Triggers) as YAML on stdout.

    evllm render llm hf://Qwen/Qwen2.5-7B-Instruct --gpus 1 | kubectl apply -f -

The objects mirror ``inferenceservices/`` (same annotations, scaling and sizing rules; tests keep the
two in step) and are checked against the vendored CRD schemas before anything is printed, so a bad
knob is a one-line error with exit code 2, never a half-applied manifest.
"""

from __future__ import annotations

import argparse
import re
import sys
from typing import Any

import yaml

from .manifests import DNS1123_LABEL, ManifestError, dns1035_error, validate_all

IMAGE = "ghcr.io/evllm/evllm"
IMAGE_VERSION = "0.1.0"  # the package version: the GPU image tag, and "<version>-cpu" for the CPU one
RUNTIME_NAME = "evllm"
EXIT_USAGE = 2

SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")  # what KServe's CRD accepts
STORAGE_SCHEMES = ("hf", "s3", "gs", "pvc", "oci", "http", "https")  # KServe storage initializer
EVENT_TYPES = ("inference.request", "batch.submitted", "batch.chunk")
_EVENT_PREFIX = re.compile(r"^[a-z0-9]+([.-][a-z0-9]+)*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_STORAGE_URI = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.*)$")

# Start-up knobs shared with inferenceservices/base (see the comments there for why each value).
ANNOTATIONS = {
    "serving.kserve.io/deploymentMode": "Knative",
    "autoscaling.knative.dev/initial-scale": "1",
    "autoscaling.knative.dev/scale-down-delay": "5m",
    "autoscaling.knative.dev/scale-to-zero-pod-retention-period": "10m",
}


class RenderError(ValueError):
    """Bad render input: the message is the one line the user sees."""


def _sizing(gpus: int) -> dict[str, Any]:
    """Per-replica defaults: GPU sizing scales with the count (1 GPU: 8 CPU / 32Gi; 4: 16 / 64Gi)."""
    if gpus == 0:
        return {"cpu": "4", "memory": "12Gi", "scale_target": 2, "container_concurrency": 4}
    return {
        "cpu": str(max(8, 4 * gpus)),
        "memory": f"{max(32, 16 * gpus)}Gi",
        "scale_target": 32,
        "container_concurrency": 64,
    }


def _check_storage_uri(uri: str) -> None:
    match = _STORAGE_URI.match(uri)
    if not match:
        raise RenderError(f"storage URI {uri!r} has no scheme: use one of {', '.join(STORAGE_SCHEMES)}")
    scheme, rest = match["scheme"], match["rest"]
    if scheme not in STORAGE_SCHEMES:
        raise RenderError(
            f"storage URI scheme {scheme!r} is not supported: use one of {', '.join(STORAGE_SCHEMES)}"
        )
    parts = [p for p in rest.split("/") if p]
    if scheme in ("hf", "pvc") and len(parts) < 2:
        shape = "hf://<org>/<model>" if scheme == "hf" else "pvc://<claim>/<path>"
        raise RenderError(f"storage URI {uri!r} must look like {shape}")
    if not parts:
        raise RenderError(f"storage URI {uri!r} names no location")


def _check_inputs(
    *,
    name: str,
    storage_uri: str,
    gpus: int,
    min_replicas: int,
    max_replicas: int,
    scale_metric: str,
    scale_target: int,
    container_concurrency: int,
    timeout: int,
    namespace: str | None,
    triggers: bool,
    broker: str,
    events_prefix: str,
    retry: int,
    max_model_len: int | None,
    engine_args: list[str],
) -> None:
    err = dns1035_error(name)
    if err:
        raise RenderError(f"invalid name: {err}")
    _check_storage_uri(storage_uri)
    if gpus < 0:
        raise RenderError(f"--gpus must be 0 (CPU) or more, got {gpus}")
    if min_replicas < 0:
        raise RenderError(f"--min-replicas must be 0 or more, got {min_replicas}")
    if max_replicas < 1:
        raise RenderError(f"--max-replicas must be at least 1, got {max_replicas}")
    if min_replicas > max_replicas:
        raise RenderError(f"--min-replicas ({min_replicas}) is greater than --max-replicas ({max_replicas})")
    if scale_metric not in SCALE_METRICS:
        raise RenderError(f"unknown scale metric {scale_metric!r}: use one of {', '.join(SCALE_METRICS)}")
    if scale_metric in ("cpu", "memory") and min_replicas == 0:
        raise RenderError(
            f"scale metric {scale_metric!r} uses the HPA autoscaler, which cannot scale to zero: "
            "use concurrency or rps, or --min-replicas 1"
        )
    if scale_target < 1:
        raise RenderError(f"--scale-target must be at least 1, got {scale_target}")
    if container_concurrency < 0:
        raise RenderError(
            f"--container-concurrency must be 0 (unlimited) or more, got {container_concurrency}"
        )
    if timeout < 1:
        raise RenderError(f"--timeout must be at least 1 second, got {timeout}")
    if max_model_len is not None and max_model_len < 1:
        raise RenderError(f"--max-model-len must be at least 1, got {max_model_len}")
    for arg in engine_args:
        if not arg.startswith("--"):
            raise RenderError(
                f"engine flag {arg!r} must start with '--' (e.g. --engine-arg=--quantization=awq)"
            )
    if namespace is not None and not (len(namespace) <= 63 and DNS1123_LABEL.match(namespace)):
        raise RenderError(f"invalid namespace {namespace!r}: must be a DNS-1123 label")
    if triggers:
        if not (len(broker) <= 63 and DNS1123_LABEL.match(broker)):
            raise RenderError(f"invalid broker name {broker!r}: must be a DNS-1123 label")
        if not _EVENT_PREFIX.match(events_prefix):
            raise RenderError(
                f"invalid events prefix {events_prefix!r}: use dotted lower-case words, e.g. dev.evllm"
            )
        longest = max(len(_trigger_name(name, t)) for t in EVENT_TYPES)
        if longest > 63:
            raise RenderError(
                f"name {name!r} is too long for its Trigger names (max 63 characters, got {longest})"
            )
        if retry < 0:
            raise RenderError(f"--retry must be 0 or more, got {retry}")


def _trigger_name(name: str, event_type: str) -> str:
    return f"{name}-{event_type.replace('.', '-')}"


def cluster_serving_runtime() -> dict[str, Any]:
    """The ``evllm`` ClusterServingRuntime, identical to inferenceservices/base/clusterservingruntime.yaml."""

    def probe(path: str, **timing: int) -> dict[str, Any]:
        return {"httpGet": {"path": path, "port": 8080}, **timing}

    return {
        "apiVersion": "serving.kserve.io/v1alpha1",
        "kind": "ClusterServingRuntime",
        "metadata": {"name": RUNTIME_NAME, "labels": {"app.kubernetes.io/part-of": "evllm"}},
        "spec": {
            "annotations": {"prometheus.kserve.io/port": "8080", "prometheus.kserve.io/path": "/metrics"},
            "supportedModelFormats": [
                {"name": "huggingface", "version": "1", "autoSelect": True, "priority": 2},
                {"name": "vllm", "autoSelect": True, "priority": 1},
            ],
            "protocolVersions": ["v2", "v1"],
            "containers": [
                {
                    "name": "kserve-container",
                    "image": f"{IMAGE}:{IMAGE_VERSION}",
                    "command": ["python", "-m", "predictors"],
                    "args": ["--model_name={{.Name}}", "--model_dir=/mnt/models", "--http_port=8080"],
                    "env": [
                        {"name": "HF_HOME", "value": "/tmp/hf-home"},
                        {"name": "VLLM_CACHE_ROOT", "value": "/tmp/vllm-cache"},
                    ],
                    "ports": [{"containerPort": 8080, "name": "http1", "protocol": "TCP"}],
                    "readinessProbe": probe(
                        "/v2/models/{{.Name}}/ready", periodSeconds=5, failureThreshold=3
                    ),
                    "livenessProbe": probe(
                        "/v2/health/live",
                        initialDelaySeconds=30,
                        periodSeconds=30,
                        timeoutSeconds=10,
                        failureThreshold=10,
                    ),
                    "resources": {"requests": {"cpu": "1", "memory": "4Gi"}, "limits": {"memory": "8Gi"}},
                }
            ],
        },
    }


def inference_service(
    name: str,
    storage_uri: str,
    *,
    gpus: int,
    min_replicas: int,
    max_replicas: int,
    scale_metric: str,
    scale_target: int,
    container_concurrency: int,
    timeout: int,
    max_model_len: int | None,
    engine_args: list[str],
    cpu: str,
    memory: str,
    progress_deadline: str,
) -> dict[str, Any]:
    if gpus:
        args = ["--dtype=auto", f"--max-model-len={max_model_len or 8192}", "--gpu-memory-utilization=0.90"]
        args += ["--enable-prefix-caching", f"--tensor-parallel-size={gpus}"]
        amounts = {"cpu": cpu, "memory": memory, "nvidia.com/gpu": str(gpus)}
    else:
        args = ["--dtype=float32", f"--max-model-len={max_model_len or 2048}"]
        amounts = {"cpu": cpu, "memory": memory}
    model: dict[str, Any] = {
        "modelFormat": {"name": "huggingface"},
        "runtime": RUNTIME_NAME,
        "storageUri": storage_uri,
        "args": args + list(engine_args),
        # Requests == limits: Guaranteed QoS, and GPU counts must match anyway.
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
    }
    predictor: dict[str, Any] = {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "scaleMetric": scale_metric,
        "scaleTarget": scale_target,
        "containerConcurrency": container_concurrency,
        "timeout": timeout,
        "model": model,
    }
    if gpus == 0:
        model["runtimeVersion"] = f"{IMAGE_VERSION}-cpu"  # KServe swaps the runtime image tag for this
        model["env"] = [{"name": "VLLM_CPU_KVCACHE_SPACE", "value": "4"}]
    if gpus > 1:  # NCCL between tensor-parallel workers needs more than the default 64 MB /dev/shm
        model["volumeMounts"] = [{"name": "dshm", "mountPath": "/dev/shm"}]
        predictor["volumes"] = [{"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": "8Gi"}}]
    annotations = {**ANNOTATIONS, "serving.knative.dev/progress-deadline": progress_deadline}
    return {
        "apiVersion": "serving.kserve.io/v1beta1",
        "kind": "InferenceService",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/part-of": "evllm"},
            "annotations": annotations,
        },
        "spec": {"predictor": predictor},
    }


def _dead_letter_sink(sink: str) -> dict[str, Any]:
    if "://" in sink:
        return {"uri": sink}
    return {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": sink}}


def trigger(
    name: str,
    event_type: str,
    *,
    broker: str,
    events_prefix: str,
    timeout: int,
    retry: int,
    backoff_delay: str,
    dead_letter_sink: str,
) -> dict[str, Any]:
    """A Trigger sending ``<prefix>.<event_type>`` events for model ``name`` to the predictor's /events."""
    return {
        "apiVersion": "eventing.knative.dev/v1",
        "kind": "Trigger",
        "metadata": {
            "name": _trigger_name(name, event_type),
            "labels": {"app.kubernetes.io/part-of": "evllm"},
        },
        "spec": {
            "broker": broker,
            # Exact-match filters: this model's events of this type only (the `model` extension attribute).
            "filter": {"attributes": {"type": f"{events_prefix}.{event_type}", "model": name}},
            "subscriber": {
                "ref": {"apiVersion": "serving.kserve.io/v1beta1", "kind": "InferenceService", "name": name},
                "uri": "/events",
            },
            "delivery": {
                # 429/503 while overloaded or cold are retried: exponential backoff spaces the retries out.
                "retry": retry,
                "backoffPolicy": "exponential",
                "backoffDelay": backoff_delay,
                # Per attempt; as long as the InferenceService's own timeout so a cold start can finish.
                "timeout": f"PT{timeout}S",
                "deadLetterSink": _dead_letter_sink(dead_letter_sink),
            },
        },
    }


def render(
    name: str,
    storage_uri: str,
    gpus: int = 0,
    min_replicas: int = 0,
    max_replicas: int = 2,
    scale_metric: str = "concurrency",
    scale_target: int | None = None,
    container_concurrency: int | None = None,
    timeout: int = 600,
    triggers: bool = False,
    broker: str = "default",
    events_prefix: str = "dev.evllm",
    *,
    namespace: str | None = None,
    max_model_len: int | None = None,
    engine_args: list[str] | None = None,
    cpu: str | None = None,
    memory: str | None = None,
    progress_deadline: str | None = None,
    with_runtime: bool = False,
    retry: int = 5,
    backoff_delay: str = "PT2S",
    dead_letter_sink: str = "evllm-dead-letter",
) -> list[dict[str, Any]]:
    """The objects for one model, validated; raises RenderError (bad input) or ManifestError (schema).

    ``gpus=0`` renders the CPU image (vllm-cpu); ``gpus=N`` requests N ``nvidia.com/gpu`` and sets
    ``--tensor-parallel-size=N``. ``scale_target``/``container_concurrency`` default per device.
    ``dead_letter_sink`` is a URI (contains ``://``) or the name of a Knative Service.
    """
    sizing = _sizing(max(gpus, 0))
    scale_target = sizing["scale_target"] if scale_target is None else scale_target
    container_concurrency = (
        sizing["container_concurrency"] if container_concurrency is None else container_concurrency
    )
    _check_inputs(
        name=name,
        storage_uri=storage_uri,
        gpus=gpus,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        scale_metric=scale_metric,
        scale_target=scale_target,
        container_concurrency=container_concurrency,
        timeout=timeout,
        namespace=namespace,
        triggers=triggers,
        broker=broker,
        events_prefix=events_prefix,
        retry=retry,
        max_model_len=max_model_len,
        engine_args=list(engine_args or []),
    )
    for flag, value in (("--cpu", cpu), ("--memory", memory)):
        if value is not None and not _QUANTITY.match(value):
            raise RenderError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 16, 500m, 64Gi)")
    isvc = inference_service(
        name,
        storage_uri,
        gpus=gpus,
        min_replicas=min_replicas,
        max_replicas=max_replicas,
        scale_metric=scale_metric,
        scale_target=scale_target,
        container_concurrency=container_concurrency,
        timeout=timeout,
        max_model_len=max_model_len,
        engine_args=list(engine_args or []),
        cpu=cpu or sizing["cpu"],
        memory=memory or sizing["memory"],
        progress_deadline=progress_deadline or ("30m" if gpus else "10m"),
    )
    objs = [cluster_serving_runtime()] if with_runtime else []
    objs.append(isvc)
    if triggers:
        objs += [
            trigger(
                name,
                event_type,
                broker=broker,
                events_prefix=events_prefix,
                timeout=timeout,
                retry=retry,
                backoff_delay=backoff_delay,
                dead_letter_sink=dead_letter_sink,
            )
            for event_type in EVENT_TYPES
        ]
    if namespace:
        for obj in objs:
            if obj["kind"] != "ClusterServingRuntime":  # cluster-scoped
                meta = obj["metadata"]
                obj["metadata"] = {"name": meta.pop("name"), "namespace": namespace, **meta}
    validate_all(objs)
    return objs


def to_yaml(objs: list[dict[str, Any]]) -> str:
    return yaml.safe_dump_all(objs, sort_keys=False, default_flow_style=False)


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("name", help="InferenceService name, also the served model name (DNS-1035 label)")
    parser.add_argument(
        "storage_uri", help="where the model is: hf://org/model, s3://..., gs://..., pvc://claim/path"
    )
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per replica; 0 = CPU image (default 0)")
    parser.add_argument("--min-replicas", type=int, default=0, help="0 = scale to zero (default 0)")
    parser.add_argument("--max-replicas", type=int, default=2, help="default 2")
    parser.add_argument("--scale-metric", default="concurrency", help=f"one of {', '.join(SCALE_METRICS)}")
    parser.add_argument(
        "--scale-target", type=int, default=None, help="per-pod target (default 32 GPU, 2 CPU)"
    )
    parser.add_argument(
        "--container-concurrency", type=int, default=None, help="per-pod hard limit (default 64 GPU, 4 CPU)"
    )
    parser.add_argument("--timeout", type=int, default=600, help="request timeout in seconds (default 600)")
    parser.add_argument("--namespace", default=None, help="metadata.namespace (default: kubectl's)")
    parser.add_argument("--max-model-len", type=int, default=None, help="vLLM context length")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra vLLM engine flag, repeatable; write it with '=': --engine-arg=--quantization=awq",
    )
    parser.add_argument("--cpu", default=None, help="CPU request = limit per replica")
    parser.add_argument("--memory", default=None, help="memory request = limit per replica, e.g. 64Gi")
    parser.add_argument(
        "--progress-deadline", default=None, help="Knative progress deadline (default 30m GPU)"
    )
    parser.add_argument(
        "--with-runtime", action="store_true", help="also print the evllm ClusterServingRuntime"
    )
    parser.add_argument("--triggers", action="store_true", help="also print Knative Eventing Triggers")
    parser.add_argument(
        "--broker", default="default", help="Broker the Triggers subscribe to (default 'default')"
    )
    parser.add_argument(
        "--events-prefix", default="dev.evllm", help="CloudEvent type prefix (default dev.evllm)"
    )
    parser.add_argument("--retry", type=int, default=5, help="Trigger delivery retries (default 5)")
    parser.add_argument("--backoff-delay", default="PT2S", help="ISO-8601 first retry delay (default PT2S)")
    parser.add_argument(
        "--dead-letter-sink",
        default="evllm-dead-letter",
        help="URI, or name of a Knative Service, for events that exhaust their retries",
    )


def add_parser(subparsers: Any) -> None:
    """Register ``render`` on an argparse subparsers object (``evllm render``)."""
    parser = subparsers.add_parser(
        "render",
        help="print a validated InferenceService (and Triggers) as YAML for kubectl apply -f -",
        description=__doc__.splitlines()[0],
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    try:
        objs = render(
            args.name,
            args.storage_uri,
            gpus=args.gpus,
            min_replicas=args.min_replicas,
            max_replicas=args.max_replicas,
            scale_metric=args.scale_metric,
            scale_target=args.scale_target,
            container_concurrency=args.container_concurrency,
            timeout=args.timeout,
            triggers=args.triggers,
            broker=args.broker,
            events_prefix=args.events_prefix,
            namespace=args.namespace,
            max_model_len=args.max_model_len,
            engine_args=args.engine_arg,
            cpu=args.cpu,
            memory=args.memory,
            progress_deadline=args.progress_deadline,
            with_runtime=args.with_runtime,
            retry=args.retry,
            backoff_delay=args.backoff_delay,
            dead_letter_sink=args.dead_letter_sink,
        )
    except RenderError as exc:
        print(f"evllm render: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except ManifestError as exc:  # an input that passed our checks but not the CRD schema
        print(f"evllm render: error: invalid manifest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    sys.stdout.write(to_yaml(objs))
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m predictors.render ...``: the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="evllm render", description=__doc__.splitlines()[0])
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

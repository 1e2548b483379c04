"""`evllm render`: a ready, validated InferenceService (and optionally its Triggers) as YAML on stdout.

    evllm render llm hf://Qwen/Qwen2.5-7B-Instruct --gpus 1 | kubectl apply -f -

Nothing is typed twice: the objects are the shipped manifests, built as ``kubectl kustomize`` builds them
(``overlays/cpu-dev`` for ``--gpus 0``, ``overlays/gpu-1x`` otherwise, plus gpu-4x's ``/dev/shm`` and
per-GPU sizing above one GPU; ``eventing/knative/triggers.yaml`` for ``--triggers``), and each flag patches
only the knob it names: a flag left out keeps the shipped value. The result is checked against the vendored
CRD schemas before anything is printed, so a bad knob is a one-line error with exit code 2, never a
half-applied manifest.
"""

from __future__ import annotations

import argparse
import copy
import math
import re
import sys
from functools import cache
from typing import Any

import yaml

from . import inputs, kustomize
from .inputs import RenderError
from .manifests import ManifestError, validate_all

CPU_OVERLAY = "overlays/cpu-dev"
GPU_OVERLAY = "overlays/gpu-1x"
MULTI_GPU_OVERLAY = "overlays/gpu-4x"  # /dev/shm for NCCL, and the per-GPU share of CPU and memory
TRIGGERS = ("eventing", "knative/triggers.yaml")
SHIPPED_EVENTS_PREFIX = "dev.evllm"  # the type prefix in triggers.yaml: eventing's default --events_prefix
GPU_RESOURCE = "nvidia.com/gpu"
EXIT_USAGE = 2
DESCRIPTION = (
    "Print a ready, validated InferenceService (and optionally its Triggers) as YAML. Flags left out keep "
    "the shipped values: the overlay's (cpu-dev for --gpus 0, gpu-1x otherwise) and "
    "eventing/knative/triggers.yaml's."
)
_AMOUNT = re.compile(r"^(?P<number>[0-9]+)(?P<unit>[A-Za-z]*)$")


@cache
def _built(directory: str) -> tuple[dict[str, Any], ...]:
    return tuple(kustomize.build(directory))


def _shipped(directory: str, kind: str) -> dict[str, Any]:
    """A fresh copy of the one ``kind`` object that ``directory`` builds."""
    (obj,) = [o for o in _built(directory) if o["kind"] == kind]
    return copy.deepcopy(obj)


def cluster_serving_runtime() -> dict[str, Any]:
    """The ``evllm`` ClusterServingRuntime, as inferenceservices/base builds it."""
    return _shipped("base", "ClusterServingRuntime")


def __getattr__(name: str) -> str:
    """``IMAGE`` and ``IMAGE_VERSION``: the runtime image's repository and tag, read on first use (the
    evllm CLI imports this module on every command, so nothing is read at import)."""
    reference: str = cluster_serving_runtime()["spec"]["containers"][0]["image"]
    image, _, version = reference.rpartition(":")
    if name == "IMAGE":
        return image
    if name == "IMAGE_VERSION":
        return version
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _flag_name(arg: str) -> str:
    return arg.partition("=")[0]


def _with_flag(args: list[str], arg: str) -> list[str]:
    """``args`` with ``arg`` (``--key=value``) in place of the same flag, or appended if it is not there."""
    names = [_flag_name(a) for a in args]
    if _flag_name(arg) in names:
        return [arg if name == _flag_name(arg) else a for a, name in zip(args, names, strict=True)]
    return [*args, arg]


def _scaled(floor: str, share: str, share_gpus: int, gpus: int) -> str:
    """``share`` (an amount for ``share_gpus`` GPUs) scaled to ``gpus``, rounded up, never below ``floor``."""
    low, per = _AMOUNT.match(floor), _AMOUNT.match(share)
    if not (low and per and low["unit"] == per["unit"]):
        raise ValueError(f"cannot scale the shipped amounts {floor!r} and {share!r}: use one integer unit")
    number = max(int(low["number"]), math.ceil(int(per["number"]) * gpus / share_gpus))
    return f"{number}{per['unit']}"


def _amounts(gpus: int) -> dict[str, str]:
    """Per-replica resources: cpu-dev's or gpu-1x's; above one GPU, gpu-4x's per-GPU share times the
    count, never below gpu-1x's (host RAM for the tokenizer, buffers and page cache does not shrink)."""
    one = _shipped(GPU_OVERLAY if gpus else CPU_OVERLAY, "InferenceService")
    amounts: dict[str, str] = one["spec"]["predictor"]["model"]["resources"]["limits"]
    if gpus <= 1:
        return amounts
    many = _shipped(MULTI_GPU_OVERLAY, "InferenceService")["spec"]["predictor"]["model"]["resources"][
        "limits"
    ]
    share_gpus = int(many[GPU_RESOURCE])
    return {
        key: str(gpus) if key == GPU_RESOURCE else _scaled(value, many[key], share_gpus, gpus)
        for key, value in amounts.items()
    }


def inference_service(
    name: str,
    storage_uri: str,
    *,
    gpus: int,
    engine_args: list[str],
    cpu: str | None,
    memory: str | None,
    max_model_len: int | None,
    progress_deadline: str | None,
    predictor: dict[str, int | str | None],
) -> dict[str, Any]:
    """The overlay's InferenceService with the given knobs patched in (``None``: keep the overlay's).

    ``predictor`` holds spec.predictor's scalar fields (minReplicas, scaleTarget, timeout, ...).
    """
    isvc = _shipped(GPU_OVERLAY if gpus else CPU_OVERLAY, "InferenceService")
    isvc["metadata"]["name"] = name  # also the served model name: --model_name={{.Name}} in the runtime
    if progress_deadline is not None:
        isvc["metadata"]["annotations"]["serving.knative.dev/progress-deadline"] = progress_deadline
    spec = isvc["spec"]["predictor"]
    spec.update({key: value for key, value in predictor.items() if value is not None})
    model = spec["model"]
    model["storageUri"] = storage_uri
    if gpus:
        model["args"] = _with_flag(model["args"], f"--tensor-parallel-size={gpus}")
    if max_model_len is not None:
        model["args"] = _with_flag(model["args"], f"--max-model-len={max_model_len}")
    shipped = {_flag_name(a) for a in model["args"]}
    for arg in engine_args:  # the overlay's own flags are replaced (vLLM would take the last anyway)
        model["args"] = (
            _with_flag(model["args"], arg) if _flag_name(arg) in shipped else [*model["args"], arg]
        )
    amounts = _amounts(gpus)
    amounts.update({key: value for key, value in (("cpu", cpu), ("memory", memory)) if value is not None})
    # Requests == limits: Guaranteed QoS, and GPU counts must match anyway.
    model["resources"] = {"requests": dict(amounts), "limits": dict(amounts)}
    if gpus > 1:  # NCCL between tensor-parallel workers needs more than the default 64 MB /dev/shm
        many = _shipped(MULTI_GPU_OVERLAY, "InferenceService")["spec"]["predictor"]
        model["volumeMounts"] = many["model"]["volumeMounts"]
        spec["volumes"] = many["volumes"]
    return isvc


def _event_name(event_type: str) -> str:
    prefix = f"{SHIPPED_EVENTS_PREFIX}."
    if not event_type.startswith(prefix):
        raise ValueError(f"{TRIGGERS[1]}: event type {event_type!r} does not start with {prefix!r}")
    return event_type.removeprefix(prefix)


def _dead_letter_sink(sink: str) -> dict[str, Any]:
    if "://" in sink:
        return {"uri": sink}
    return {"ref": {"apiVersion": "serving.knative.dev/v1", "kind": "Service", "name": sink}}


def triggers_for(
    name: str,
    *,
    timeout: int,
    broker: str | None,
    events_prefix: str | None,
    retry: int | None,
    backoff_delay: str | None,
    dead_letter_sink: str | None,
) -> list[dict[str, Any]]:
    """eventing/knative/triggers.yaml aimed at InferenceService ``name`` (``None``: keep the shipped value).

    Each Trigger is named ``<name>-<event type>`` and filters on the ``model`` attribute = ``name``.
    """
    triggers = kustomize.read_yaml(*TRIGGERS)
    for trigger in triggers:
        spec = trigger["spec"]
        attributes = spec["filter"]["attributes"]
        event = _event_name(attributes["type"])
        trigger["metadata"]["name"] = f"{name}-{event.replace('.', '-')}"
        attributes["model"] = name
        if events_prefix is not None:
            attributes["type"] = f"{events_prefix}.{event}"
        spec["subscriber"]["ref"]["name"] = name
        if broker is not None:
            spec["broker"] = broker
        delivery = spec["delivery"]
        # Per attempt, always the InferenceService's own timeout: an event that wakes a scaled-to-zero
        # predictor waits through the cold start, and a shorter attempt would be cut off and retried.
        delivery["timeout"] = f"PT{timeout}S"
        if retry is not None:
            delivery["retry"] = retry
        if backoff_delay is not None:
            delivery["backoffDelay"] = backoff_delay
        if dead_letter_sink is not None:
            delivery["deadLetterSink"] = _dead_letter_sink(dead_letter_sink)
    longest = max(len(t["metadata"]["name"]) for t in triggers)
    if longest > 63:
        raise RenderError(
            f"name {name!r} is too long for its Trigger names (max 63 characters, got {longest})"
        )
    return triggers


def render(
    name: str,
    storage_uri: str,
    *,
    gpus: int = 0,
    min_replicas: int | None = None,
    max_replicas: int | None = None,
    scale_metric: str | None = None,
    scale_target: int | None = None,
    container_concurrency: int | None = None,
    timeout: int | None = None,
    max_model_len: int | None = None,
    engine_args: list[str] | None = None,
    cpu: str | None = None,
    memory: str | None = None,
    progress_deadline: str | None = None,
    namespace: str | None = None,
    with_runtime: bool = False,
    triggers: bool = False,
    broker: str | None = None,
    events_prefix: str | None = None,
    retry: int | None = None,
    backoff_delay: str | None = None,
    dead_letter_sink: str | None = None,
) -> list[dict[str, Any]]:
    """The objects for one model, validated; raises RenderError (bad input) or ManifestError (schema).

    Every ``None`` keeps the shipped value. ``gpus=0`` is the cpu-dev overlay (vllm-cpu image); ``gpus=N``
    is gpu-1x with N ``nvidia.com/gpu`` and ``--tensor-parallel-size=N``. ``dead_letter_sink`` is a URI
    (contains ``://``) or the name of a Knative Service.
    """
    engine_args = list(engine_args or [])
    inputs.check_name(name)
    inputs.check_storage_uri(storage_uri)
    inputs.check_at_least("--gpus", gpus, 0, "0 (CPU) or more")
    inputs.check_at_least("--min-replicas", min_replicas, 0, "0 or more")
    inputs.check_at_least("--max-replicas", max_replicas, 1, "at least 1")
    inputs.check_at_least("--scale-target", scale_target, 1, "at least 1")
    inputs.check_at_least("--container-concurrency", container_concurrency, 0, "0 (unlimited) or more")
    inputs.check_at_least("--timeout", timeout, 1, "at least 1 second")
    inputs.check_at_least("--max-model-len", max_model_len, 1, "at least 1")
    inputs.check_engine_args(engine_args)
    inputs.check_quantity("--cpu", cpu)
    inputs.check_quantity("--memory", memory)
    inputs.check_go_duration("--progress-deadline", progress_deadline)
    inputs.check_dns1123_label("namespace", namespace, "ml")
    isvc = inference_service(
        name,
        storage_uri,
        gpus=gpus,
        engine_args=engine_args,
        cpu=cpu,
        memory=memory,
        max_model_len=max_model_len,
        progress_deadline=progress_deadline,
        predictor={
            "minReplicas": min_replicas,
            "maxReplicas": max_replicas,
            "scaleMetric": scale_metric,
            "scaleTarget": scale_target,
            "containerConcurrency": container_concurrency,
            "timeout": timeout,
        },
    )
    predictor = isvc["spec"]["predictor"]
    inputs.check_scaling(
        min_replicas=predictor["minReplicas"],
        max_replicas=predictor["maxReplicas"],
        scale_metric=predictor["scaleMetric"],
    )
    objs = [cluster_serving_runtime()] if with_runtime else []
    objs.append(isvc)
    if triggers:
        inputs.check_dns1123_label("broker name", broker, "evllm")
        inputs.check_events_prefix(events_prefix)
        inputs.check_at_least("--retry", retry, 0, "0 or more")
        inputs.check_iso_duration("--backoff-delay", backoff_delay)
        objs += triggers_for(
            name,
            timeout=predictor["timeout"],
            broker=broker,
            events_prefix=events_prefix,
            retry=retry,
            backoff_delay=backoff_delay,
            dead_letter_sink=dead_letter_sink,
        )
    if namespace:
        for obj in objs:
            if obj["kind"] != "ClusterServingRuntime":  # cluster-scoped
                meta = obj["metadata"]
                obj["metadata"] = {"name": meta.pop("name"), "namespace": namespace, **meta}
    validate_all(objs)
    return objs


def to_yaml(objs: list[dict[str, Any]]) -> str:
    text: str = yaml.safe_dump_all(objs, sort_keys=False, default_flow_style=False)
    return text


def _add_arguments(parser: argparse.ArgumentParser) -> None:
    shipped = "(default: the overlay's)"
    parser.add_argument("name", help="InferenceService name, also the served model name (DNS-1035 label)")
    parser.add_argument(
        "storage_uri", help="where the model is: hf://org/model, s3://..., gs://..., pvc://claim/path"
    )
    parser.add_argument("--gpus", type=int, default=0, help="GPUs per replica; 0 = CPU image (default 0)")
    parser.add_argument("--min-replicas", type=int, default=None, help=f"0 = scale to zero {shipped}")
    parser.add_argument("--max-replicas", type=int, default=None, help=f"replica cap {shipped}")
    parser.add_argument(
        "--scale-metric", default=None, help=f"one of {', '.join(inputs.SCALE_METRICS)} {shipped}"
    )
    parser.add_argument("--scale-target", type=int, default=None, help=f"per-pod target {shipped}")
    parser.add_argument(
        "--container-concurrency", type=int, default=None, help=f"per-pod hard limit {shipped}"
    )
    parser.add_argument(
        "--timeout", type=int, default=None, help=f"request timeout in seconds, Triggers' too {shipped}"
    )
    parser.add_argument("--namespace", default=None, help="metadata.namespace (default: kubectl's)")
    parser.add_argument("--max-model-len", type=int, default=None, help=f"vLLM context length {shipped}")
    parser.add_argument(
        "--engine-arg",
        action="append",
        default=[],
        metavar="FLAG",
        help="extra vLLM engine flag, repeatable; write it with '=': --engine-arg=--quantization=awq",
    )
    parser.add_argument(
        "--cpu", default=None, help="CPU request = limit per replica (default: scales with --gpus)"
    )
    parser.add_argument(
        "--memory",
        default=None,
        help="memory request = limit per replica, e.g. 64Gi (default: scales with --gpus)",
    )
    parser.add_argument("--progress-deadline", default=None, help=f"Knative progress deadline {shipped}")
    parser.add_argument(
        "--with-runtime", action="store_true", help="also print the evllm ClusterServingRuntime"
    )
    parser.add_argument(
        "--triggers", action="store_true", help="also print the Triggers of eventing/knative/triggers.yaml"
    )
    triggers = "(default: triggers.yaml's)"
    parser.add_argument("--broker", default=None, help=f"Broker the Triggers subscribe to {triggers}")
    parser.add_argument("--events_prefix", default=None, help=f"CloudEvent type prefix {triggers}")
    parser.add_argument("--retry", type=int, default=None, help=f"Trigger delivery retries {triggers}")
    parser.add_argument("--backoff-delay", default=None, help=f"ISO-8601 first retry delay {triggers}")
    parser.add_argument(
        "--dead-letter-sink",
        default=None,
        help=f"URI, or name of a Knative Service, for events that exhaust their retries {triggers}",
    )


def add_parser(subparsers: Any) -> None:
    """Register ``render`` on an argparse subparsers object (``evllm render``)."""
    parser = subparsers.add_parser(
        "render",
        help="print a validated InferenceService (and Triggers) as YAML for kubectl apply -f -",
        description=DESCRIPTION,
    )
    _add_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    """Print the objects for ``args`` as YAML (exit 0), or one error line on stderr (exit 2)."""
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
            max_model_len=args.max_model_len,
            engine_args=args.engine_arg,
            cpu=args.cpu,
            memory=args.memory,
            progress_deadline=args.progress_deadline,
            namespace=args.namespace,
            with_runtime=args.with_runtime,
            triggers=args.triggers,
            broker=args.broker,
            events_prefix=args.events_prefix,
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
    """``python -m inferenceservices.render ...``: the same command without the rest of the CLI."""
    parser = argparse.ArgumentParser(prog="evllm render", description=DESCRIPTION)
    _add_arguments(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

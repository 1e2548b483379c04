"""Checks on ``evllm render``'s inputs: every bad value is one line naming the flag, before any YAML."""

from __future__ import annotations

import re

from .manifests import DNS1123_LABEL, dns1035_error

SCALE_METRICS = ("concurrency", "rps", "cpu", "memory")  # what KServe's CRD accepts
STORAGE_SCHEMES = ("hf", "s3", "gs", "pvc", "oci", "http", "https")  # KServe storage initializer
_EVENTS_PREFIX = re.compile(r"^[a-z0-9]+([.-][a-z0-9]+)*$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|k|M|G|T|P|E|Ki|Mi|Gi|Ti|Pi|Ei)?$")
_STORAGE_URI = re.compile(r"^(?P<scheme>[a-z][a-z0-9+.-]*)://(?P<rest>.*)$")
# Knative reads progress-deadline with Go's time.ParseDuration and Trigger delays as ISO-8601 durations.
_GO_DURATION = re.compile(r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$")
_ISO_DURATION = re.compile(r"^P(?!$)([0-9]+D)?(T(?=[0-9])([0-9]+H)?([0-9]+M)?([0-9]+(\.[0-9]+)?S)?)?$")


class RenderError(ValueError):
    """Bad render input: the message is the one line the user sees."""


def check_name(name: str) -> None:
    err = dns1035_error(name)
    if err:
        raise RenderError(f"invalid name: {err}")


def check_storage_uri(uri: str) -> None:
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


def check_at_least(flag: str, value: int | None, minimum: int, bound: str) -> None:
    """``value`` (None: not given) is ``minimum`` or more; ``bound`` says so in words for the message."""
    if value is not None and value < minimum:
        raise RenderError(f"{flag} must be {bound}, got {value}")


def check_quantity(flag: str, value: str | None) -> None:
    if value is not None and not _QUANTITY.match(value):
        raise RenderError(f"{flag} {value!r} is not a Kubernetes quantity (e.g. 16, 500m, 64Gi)")


def check_go_duration(flag: str, value: str | None) -> None:
    if value is not None and not _GO_DURATION.match(value):
        raise RenderError(f"{flag} {value!r} is not a duration (e.g. 30m, 1h, 90s)")


def check_iso_duration(flag: str, value: str | None) -> None:
    if value is not None and not _ISO_DURATION.match(value):
        raise RenderError(f"{flag} {value!r} is not an ISO-8601 duration (e.g. PT0.5S, PT2S, PT1M)")


def check_engine_args(engine_args: list[str]) -> None:
    for arg in engine_args:
        if not arg.startswith("--"):
            raise RenderError(
                f"engine flag {arg!r} must start with '--' (e.g. --engine-arg=--quantization=awq)"
            )


def check_dns1123_label(what: str, value: str | None, example: str) -> None:
    if value is not None and not (len(value) <= 63 and DNS1123_LABEL.match(value)):
        raise RenderError(f"invalid {what} {value!r}: must be a DNS-1123 label, e.g. {example}")


def check_events_prefix(prefix: str | None) -> None:
    if prefix is not None and not _EVENTS_PREFIX.match(prefix):
        raise RenderError(f"invalid events prefix {prefix!r}: use dotted lower-case words, e.g. dev.evllm")


def check_scaling(*, min_replicas: int, max_replicas: int, scale_metric: str) -> None:
    """The resolved scaling knobs (flags over the overlay's values) make sense together."""
    if min_replicas > max_replicas:
        raise RenderError(f"--min-replicas ({min_replicas}) is greater than --max-replicas ({max_replicas})")
    if scale_metric not in SCALE_METRICS:
        raise RenderError(f"unknown scale metric {scale_metric!r}: use one of {', '.join(SCALE_METRICS)}")
    if scale_metric in ("cpu", "memory") and min_replicas == 0:
        raise RenderError(
            f"scale metric {scale_metric!r} uses the HPA autoscaler, which cannot scale to zero: "
            "use concurrency or rps, or --min-replicas 1"
        )

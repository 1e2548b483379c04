"""Offline validation of Kubernetes objects against the CRD schemas vendored in ``inferenceservices/crds``.

Three checks, so a manifest that passes here is one the API server would accept *as written*:

1. the served version's ``openAPIV3Schema`` (types, enums, required fields) with jsonschema;
2. a strict unknown-field check: the API server silently *prunes* fields a structural schema does
   not declare, so a typo such as ``minReplica`` would apply cleanly and do nothing. We reject it;
3. ``metadata``: CRD schemas only say ``type: object``, so names (DNS-1035) and labels/annotations
   are checked here.

CEL rules (``x-kubernetes-validations``) and admission webhooks are not evaluated.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Iterator
from functools import lru_cache
from pathlib import Path
from typing import Any

import jsonschema
import yaml

CRD_DIR = Path(__file__).resolve().parent / "crds"
CRD_FILES = (
    "serving.kserve.io_clusterservingruntimes.yaml",
    "serving.kserve.io_servingruntimes.yaml",
    "serving.kserve.io_inferenceservices.yaml",
    "knative-serving-service.yaml",
    "knative-eventing-broker.yaml",
    "knative-eventing-trigger.yaml",
)

DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
_QUALIFIED_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
_OBJECT_META_FIELDS = frozenset(
    {"name", "namespace", "generateName", "labels", "annotations", "finalizers", "ownerReferences"}
)
_TOP_LEVEL = frozenset({"apiVersion", "kind", "metadata"})

# Core objects that overlays ship beside the CRs have no CRD; a minimal strict schema of the fields
# of core/v1 PersistentVolumeClaim keeps them under the same two checks.
_QUANTITY = {"anyOf": [{"type": "integer"}, {"type": "string"}], "x-kubernetes-int-or-string": True}
_PVC_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["spec"],
    "properties": {
        "apiVersion": {"type": "string"},
        "kind": {"type": "string"},
        "metadata": {"type": "object"},
        "spec": {
            "type": "object",
            "required": ["accessModes", "resources"],
            "properties": {
                "accessModes": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "string",
                        "enum": ["ReadWriteOnce", "ReadOnlyMany", "ReadWriteMany", "ReadWriteOncePod"],
                    },
                },
                "resources": {
                    "type": "object",
                    "required": ["requests"],
                    "properties": {
                        "requests": {"type": "object", "additionalProperties": _QUANTITY},
                        "limits": {"type": "object", "additionalProperties": _QUANTITY},
                    },
                },
                "storageClassName": {"type": "string"},
                "volumeMode": {"type": "string", "enum": ["Filesystem", "Block"]},
                "volumeName": {"type": "string"},
                "volumeAttributesClassName": {"type": "string"},
            },
        },
    },
}
_BUILTIN_SCHEMAS: dict[tuple[str, str], dict[str, Any]] = {("v1", "PersistentVolumeClaim"): _PVC_SCHEMA}
# batch/v1 Job (the model-cache overlay's one-off `evllm prepare`): its pod template's fields are core
# PodSpec fields, whose schemas the InferenceService CRD already carries (predictor = a PodSpec).
_POD_FIELDS = (
    "containers", "initContainers", "volumes", "nodeSelector", "tolerations", "affinity", "securityContext",
    "serviceAccountName",
)  # fmt: skip


def _job_schema(isvc: dict[str, Any]) -> dict[str, Any]:
    predictor = isvc["properties"]["spec"]["properties"]["predictor"]["properties"]
    pod = {name: predictor[name] for name in _POD_FIELDS}
    pod["restartPolicy"] = {"type": "string", "enum": ["OnFailure", "Never"]}  # a Job's pods only
    return {
        "type": "object",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": {
                "type": "object",
                "required": ["template"],
                "properties": {
                    "backoffLimit": {"type": "integer", "minimum": 0},
                    "activeDeadlineSeconds": {"type": "integer", "minimum": 1},
                    "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                    "template": {
                        "type": "object",
                        "properties": {
                            "metadata": {"type": "object"},
                            "spec": {
                                "type": "object",
                                "required": ["containers", "restartPolicy"],
                                "properties": pod,
                            },
                        },
                    },
                },
            },
        },
    }


class ManifestError(ValueError):
    """One or more objects failed validation; ``errors`` lists every problem, one line each."""

    def __init__(self, errors: list[str]):
        super().__init__("; ".join(errors))
        self.errors = errors


def _openapi_to_jsonschema(node: Any) -> Any:
    """OpenAPI 3.0's ``nullable`` is not JSON Schema: widen ``type`` so ``null`` passes where allowed."""
    if isinstance(node, dict):
        out = {k: _openapi_to_jsonschema(v) for k, v in node.items()}
        if out.get("nullable") is True and isinstance(out.get("type"), str):
            out["type"] = [out["type"], "null"]
        return out
    if isinstance(node, list):
        return [_openapi_to_jsonschema(v) for v in node]
    return node


def _load_yaml(path: Path) -> list[dict[str, Any]]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the KServe CRDs are ~2 MB: libyaml is 10x faster
    with path.open(encoding="utf-8") as fh:
        return [doc for doc in yaml.load_all(fh, Loader=loader) if doc]


@lru_cache(maxsize=4)
def load_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """Map ``(apiVersion, kind)`` of every *served* CRD version to its openAPIV3Schema."""
    schemas: dict[tuple[str, str], dict[str, Any]] = dict(_BUILTIN_SCHEMAS)
    for name in CRD_FILES:
        for crd in _load_yaml(crd_dir / name):
            if crd.get("kind") != "CustomResourceDefinition":
                continue
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version.get("schema", {}).get("openAPIV3Schema")
                if version.get("served") and schema:
                    schemas[(f"{group}/{version['name']}", kind)] = _openapi_to_jsonschema(schema)
    schemas[("batch/v1", "Job")] = _job_schema(schemas[("serving.kserve.io/v1beta1", "InferenceService")])
    return schemas


def _describe(obj: dict[str, Any]) -> str:
    name = (obj.get("metadata") or {}).get("name", "<unnamed>")
    return f"{obj.get('kind', '<no kind>')}/{name}"


def _path(parts: Iterable[Any]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "<root>"


def unknown_fields(value: Any, schema: dict[str, Any], path: tuple[Any, ...] = ()) -> Iterator[str]:
    """Yield one message per field that ``schema`` does not declare (what the API server would prune)."""
    if schema.get("x-kubernetes-int-or-string"):
        return
    preserve = bool(schema.get("x-kubernetes-preserve-unknown-fields"))
    if isinstance(value, dict):
        props: dict[str, Any] = schema.get("properties") or {}
        extra = schema.get("additionalProperties")
        implicit = _TOP_LEVEL if (not path or schema.get("x-kubernetes-embedded-resource")) else frozenset()
        for key, sub in value.items():
            if key in implicit:  # ObjectMeta is the API server's, not the CRD's: see _metadata_errors
                continue
            if key in props:
                yield from unknown_fields(sub, props[key], (*path, key))
            elif isinstance(extra, dict):
                yield from unknown_fields(sub, extra, (*path, key))
            elif preserve or extra is True:
                continue
            else:
                hint = difflib.get_close_matches(str(key), list(props), n=1)
                suffix = f" (did you mean {hint[0]!r}?)" if hint else ""
                yield f"{_path((*path, key))}: unknown field{suffix}"
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        for i, item in enumerate(value):
            yield from unknown_fields(item, schema["items"], (*path, i))


def _metadata_errors(obj: dict[str, Any]) -> Iterator[str]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        yield "metadata: required object is missing"
        return
    for key in meta:
        if key not in _OBJECT_META_FIELDS:
            hint = difflib.get_close_matches(str(key), sorted(_OBJECT_META_FIELDS), n=1)
            yield f"metadata.{key}: unknown field" + (f" (did you mean {hint[0]!r}?)" if hint else "")
    name = meta.get("name")
    if not isinstance(name, str) or not name:
        yield "metadata.name: required"
    else:
        err = dns1035_error(name)
        if err:
            yield f"metadata.name: {err}"
    namespace = meta.get("namespace")
    if namespace is not None and not (
        isinstance(namespace, str) and len(namespace) <= 63 and DNS1123_LABEL.match(namespace)
    ):
        yield f"metadata.namespace: {namespace!r} is not a valid namespace name"
    for field in ("labels", "annotations"):
        mapping = meta.get(field, {})
        if not isinstance(mapping, dict):
            yield f"metadata.{field}: must be a map of string to string"
            continue
        for key, val in mapping.items():
            if not isinstance(val, str):
                yield f"metadata.{field}.{key}: value must be a string, got {type(val).__name__}"
            prefix, _, short = str(key).rpartition("/")
            if not _QUALIFIED_NAME.match(short) or len(short) > 63:
                yield f"metadata.{field}: invalid key {key!r}"
            elif prefix and not DNS1123_SUBDOMAIN.match(prefix):
                yield f"metadata.{field}: invalid key prefix in {key!r}"


def dns1035_error(name: str) -> str | None:
    """Why ``name`` is not a DNS-1035 label (KServe requires one for InferenceService names), or None."""
    if len(name) > 63:
        return f"{name!r} is longer than 63 characters"
    if not DNS1035_LABEL.match(name):
        return (
            f"{name!r} is not a valid DNS-1035 label: lower-case letters, digits and '-', "
            "starting with a letter and ending with a letter or digit"
        )
    return None


def validate(obj: dict[str, Any], crd_dir: Path = CRD_DIR) -> list[str]:
    """Every problem with ``obj`` as one line each (prefixed ``Kind/name:``); empty means valid."""
    if not isinstance(obj, dict):
        return [f"expected a mapping, got {type(obj).__name__}"]
    where = _describe(obj)
    key = (obj.get("apiVersion"), obj.get("kind"))
    schema = load_schemas(crd_dir).get(key)  # type: ignore[arg-type]
    if schema is None:
        return [f"{where}: no served schema for apiVersion={key[0]!r} kind={key[1]!r}"]
    errors = [f"{where}: {msg}" for msg in _metadata_errors(obj)]
    validator = jsonschema.Draft4Validator(schema)  # OpenAPI 3.0 schemas are draft-4 shaped
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        errors.append(f"{where}: {_path(err.absolute_path)}: {err.message}")
    errors.extend(f"{where}: {msg}" for msg in unknown_fields(obj, schema))
    return errors


def validate_all(objs: Iterable[dict[str, Any]], crd_dir: Path = CRD_DIR) -> None:
    """Raise ManifestError listing every problem in ``objs``."""
    errors = [msg for obj in objs for msg in validate(obj, crd_dir)]
    if errors:
        raise ManifestError(errors)


def load_documents(text: str) -> list[dict[str, Any]]:
    """Parse multi-document YAML (e.g. ``kubectl kustomize`` output), dropping empty documents."""
    return [doc for doc in yaml.safe_load_all(text) if doc]

"""The part of ``kustomize build`` that ``inferenceservices/`` uses, so render starts from the shipped files.

Supported: ``resources`` (files and directories), ``patches`` given by ``path`` (merged over the object
with the same apiVersion/kind/name: maps merge, lists are replaced whole, ``null`` deletes), and
``labels`` with ``pairs`` (added to metadata.labels only). Anything else raises, so an overlay that starts
using another kustomize feature fails here instead of rendering something ``kubectl kustomize`` would not
(tests/inferenceservices/test_render_vs_kustomize.py compares the two on every overlay).

Files are package data (importlib.resources), so this works from an installed wheel too.
"""

from __future__ import annotations

import copy
import posixpath
from importlib.resources import files
from typing import Any

import yaml

PACKAGE = "inferenceservices"
_KUSTOMIZATION_FIELDS = frozenset({"apiVersion", "kind", "resources", "patches", "labels"})


class KustomizeError(ValueError):
    """A kustomization uses something this subset does not implement, or a patch matches nothing."""


def read_yaml(package: str, path: str) -> list[dict[str, Any]]:
    """The non-empty documents of a YAML file shipped in ``package`` (``path`` is '/'-separated)."""
    text = files(package).joinpath(*path.split("/")).read_text(encoding="utf-8")
    return [doc for doc in yaml.safe_load_all(text) if doc]


def merge_patch(target: Any, patch: Any) -> Any:
    """``patch`` merged over ``target`` (RFC 7386: what kustomize does for CRDs, which carry no merge keys)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    if any(str(key).startswith("$") for key in patch):  # strategic-merge directives such as $patch
        raise KustomizeError(f"unsupported patch directive in {sorted(patch)}")
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def _identity(obj: dict[str, Any]) -> tuple[Any, Any, Any]:
    return obj.get("apiVersion"), obj.get("kind"), (obj.get("metadata") or {}).get("name")


def _join(directory: str, relative: str) -> str:
    path = posixpath.normpath(posixpath.join(directory, relative))
    if path == ".." or path.startswith("../") or posixpath.isabs(path):
        raise KustomizeError(f"{directory}: {relative!r} leaves the package")
    return path


def build(directory: str, package: str = PACKAGE) -> list[dict[str, Any]]:
    """The objects ``kubectl kustomize <package>/<directory>`` prints, in resource order."""
    (kustomization,) = read_yaml(package, f"{directory}/kustomization.yaml")
    unsupported = sorted(set(kustomization) - _KUSTOMIZATION_FIELDS)
    if unsupported:
        raise KustomizeError(f"{directory}/kustomization.yaml: unsupported fields {unsupported}")
    objs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = _join(directory, resource)
        if files(package).joinpath(*path.split("/")).is_dir():
            objs += build(path, package)
        else:
            objs += read_yaml(package, path)
    for entry in kustomization.get("patches", []):
        if set(entry) != {"path"}:
            raise KustomizeError(f"{directory}: only patches by path are supported, got {sorted(entry)}")
        for patch in read_yaml(package, _join(directory, entry["path"])):
            matches = [i for i, obj in enumerate(objs) if _identity(obj) == _identity(patch)]
            if len(matches) != 1:
                raise KustomizeError(f"{directory}: patch {_identity(patch)} matches {len(matches)} objects")
            objs[matches[0]] = merge_patch(objs[matches[0]], patch)
    for entry in kustomization.get("labels", []):
        if set(entry) != {"pairs"}:  # includeSelectors / includeTemplates would touch more than metadata
            raise KustomizeError(f"{directory}: only labels with pairs are supported, got {sorted(entry)}")
        for obj in objs:
            obj.setdefault("metadata", {}).setdefault("labels", {}).update(entry["pairs"])
    return objs

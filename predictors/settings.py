"""Settings declared once: a documented dataclass field becomes a flag and an environment variable.

vLLM's `cli_args.py` pattern (each setting a typed dataclass field with its help) plus the environment
prefix Kubernetes users set things with: the field ``max_request_bytes`` is ``--max_request_bytes`` and
``EVLLM_MAX_REQUEST_BYTES``; a flag on the command line wins over the environment, which wins over the
default. Flags keep KServe's underscore spelling (``--model_name``, ``--http_port``) so one server has
one style; vLLM's engine flags keep theirs (kebab-case) because they are vLLM's.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import types
import typing
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

ENV_PREFIX = "EVLLM_"

T = TypeVar("T")


class SettingsError(ValueError):
    """A setting's value (from a flag or the environment) cannot be used: the message names it."""


def setting(
    default: Any,
    help: str,
    *,
    env: str | None = None,
    choices: tuple[str, ...] | None = None,
    flag: bool = True,
) -> Any:
    """A settings field. ``env`` overrides the environment variable's name (e.g. Knative's ``K_SINK``);
    ``flag=False`` keeps a value out of the command line (secrets: they would show in ``ps``)."""
    meta = {"help": help, "env": env, "choices": choices, "flag": flag}
    if isinstance(default, list):  # a fresh list per instance
        return dataclasses.field(default_factory=lambda: list(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def env_name(field: dataclasses.Field[Any]) -> str:
    return field.metadata.get("env") or ENV_PREFIX + field.name.upper()


def _base_type(tp: Any) -> tuple[Any, bool]:
    """(type, optional) for ``int``, ``int | None``, ``list[str]``, ..."""
    if isinstance(tp, types.UnionType) or typing.get_origin(tp) is typing.Union:
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        return args[0], True
    return tp, False


def _parser_for(tp: Any, name: str) -> Callable[[str], Any]:
    """Text (a flag's or a variable's) -> the field's type; errors start with ``name`` when given."""
    base, optional = _base_type(tp)
    where = f"{name}: " if name else ""

    def parse(text: str) -> Any:
        if optional and text == "":
            return None
        if base is bool:
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off", ""):
                return False
            raise SettingsError(f"{where}expected true or false, got {text!r}")
        if typing.get_origin(base) is list:
            return [part.strip() for part in text.split(",") if part.strip()]
        try:
            return base(text)
        except ValueError:
            raise SettingsError(f"{where}expected {base.__name__}, got {text!r}") from None

    return parse


def _flag_parser(tp: Any) -> Callable[[str], Any]:
    """For argparse: its own error type, so the message reaches the user instead of "invalid value"
    (argparse names the flag itself)."""
    parse = _parser_for(tp, "")

    def flag(text: str) -> Any:
        try:
            return parse(text)
        except SettingsError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None

    return flag


def fields(cls: type[Any]) -> list[tuple[dataclasses.Field[Any], Any]]:
    hints = typing.get_type_hints(cls)
    return [(f, hints[f.name]) for f in dataclasses.fields(cls) if f.init and "help" in f.metadata]


def add_arguments(
    parser: argparse.ArgumentParser,
    cls: type[Any],
    title: str,
    description: str | None = None,
    environ: Mapping[str, str] | None = None,
) -> None:
    """One argument group for a settings dataclass; environment values become the flags' defaults (a bad
    environment value is a usage error naming the variable)."""
    env = os.environ if environ is None else environ
    group = parser.add_argument_group(title, description)
    for field, tp in fields(cls):
        if not field.metadata["flag"]:
            continue
        parse = _flag_parser(tp)
        default = _default(field)
        var = env_name(field)
        if var in env:
            try:
                default = _parser_for(tp, var)(env[var])
            except SettingsError as exc:
                parser.error(str(exc))
            choices = field.metadata["choices"]
            if choices and default not in choices:
                parser.error(f"{var}: expected one of {', '.join(choices)}, got {env[var]!r}")
        base, _ = _base_type(tp)
        help_text = f"{field.metadata['help']} [{var}; default: {_show(_default(field))}]"
        if base is bool:
            group.add_argument(
                "--" + field.name,
                action=argparse.BooleanOptionalAction,
                default=default,
                help=help_text,
            )
            continue
        group.add_argument(
            "--" + field.name,
            type=parse,
            default=default,
            choices=field.metadata["choices"],
            metavar=None if field.metadata["choices"] else field.name.upper(),
            help=help_text,
        )


def from_namespace(cls: type[T], args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> T:
    """Build a settings object from parsed flags; env-only fields come from the environment."""
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for field, tp in fields(cls):
        if field.metadata["flag"]:
            values[field.name] = getattr(args, field.name)
        elif env_name(field) in env:
            values[field.name] = _parser_for(tp, env_name(field))(env[env_name(field)])
    obj = cls(**values)
    check = getattr(obj, "check", None)
    if check is not None:
        check()
    return obj


def _default(field: dataclasses.Field[Any]) -> Any:
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return field.default


def _show(value: Any) -> str:
    if value is None:
        return "unset"
    if isinstance(value, list):
        return ",".join(str(v) for v in value) or "none"
    return str(value)

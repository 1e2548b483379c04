"""Settings declared once (predictors/settings.py): a dataclass field is a flag `--name` and an environment
variable `EVLLM_NAME`; the flag beats the environment, which beats the default."""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

import pytest

from eventing.extension import Eventing
from predictors.server import build_parser
from predictors.settings import SettingsError, add_arguments, env_name, fields, from_namespace, setting


@dataclass(frozen=True)
class Example:
    count: int = setting(3, "How many.")
    ratio: float = setting(0.5, "A ratio.")
    enabled: bool = setting(False, "A switch.")
    names: list[str] = setting(["a", "b"], "Names, comma-separated.")
    empty: list[str] = setting([], "Nothing by default.")
    limit: int | None = setting(None, "An optional limit.")
    mode: str = setting("fast", "A mode.", choices=("fast", "slow"))
    secret: list[str] = setting([], "Environment only.", flag=False)
    sink: str | None = setting(None, "Named by someone else.", env="K_SINK_EXAMPLE")

    def check(self) -> None:
        if self.count < 0:
            raise SettingsError("--count must not be negative")


@dataclass(frozen=True)
class Strict:
    timeout: float = setting(1.0, "Environment only.", flag=False)


def parse(argv: list[str], env: dict[str, str] | None = None) -> Example:
    env = env or {}
    parser = argparse.ArgumentParser(prog="example", exit_on_error=False)
    add_arguments(parser, Example, "example", environ=env)
    return from_namespace(Example, parser.parse_args(argv), environ=env)


def test_default_then_environment_then_flag():
    assert parse([]) == Example()
    assert parse([], {"EVLLM_COUNT": "7"}).count == 7
    assert parse(["--count", "9"], {"EVLLM_COUNT": "7"}).count == 9
    assert parse(["--ratio", "0.25"]).ratio == 0.25
    assert parse([], {"EVLLM_RATIO": "2"}).ratio == 2.0


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1", True), ("true", True), ("Yes", True), (" on ", True), ("0", False), ("false", False),
     ("NO", False), ("off", False), ("", False)],
)  # fmt: skip
def test_bool_from_the_environment(value: str, expected: bool):
    assert parse([], {"EVLLM_ENABLED": value}).enabled is expected


def test_bool_flags_switch_both_ways():
    assert parse(["--enabled"]).enabled is True
    assert parse(["--no-enabled"], {"EVLLM_ENABLED": "true"}).enabled is False
    assert parse(["--enabled"], {"EVLLM_ENABLED": "false"}).enabled is True


def test_lists_are_comma_separated():
    assert parse([]).names == ["a", "b"]
    assert parse([], {"EVLLM_NAMES": "x, y,,z "}).names == ["x", "y", "z"]
    assert parse(["--names", "p,q"], {"EVLLM_NAMES": "x"}).names == ["p", "q"]
    assert parse([], {"EVLLM_NAMES": ""}).names == []
    # Defaults are fresh lists: one settings object never shares a list with another.
    a, b = Example(), Example()
    assert a.names == b.names and a.names is not b.names


def test_optional_values():
    assert parse([]).limit is None
    assert parse([], {"EVLLM_LIMIT": "5"}).limit == 5
    assert parse([], {"EVLLM_LIMIT": ""}).limit is None  # set but empty: unset
    assert parse(["--limit", "6"]).limit == 6
    assert parse([], {"K_SINK_EXAMPLE": "http://broker"}).sink == "http://broker"
    assert parse([], {"EVLLM_SINK": "http://ignored"}).sink is None


@pytest.mark.parametrize(
    ("env", "message"),
    [
        ({"EVLLM_COUNT": "ten"}, "EVLLM_COUNT: expected int, got 'ten'"),
        ({"EVLLM_RATIO": "half"}, "EVLLM_RATIO: expected float, got 'half'"),
        ({"EVLLM_ENABLED": "maybe"}, "EVLLM_ENABLED: expected true or false, got 'maybe'"),
        ({"EVLLM_LIMIT": "5.5"}, "EVLLM_LIMIT: expected int, got '5.5'"),
    ],
)
def test_a_bad_environment_value_is_a_usage_error_naming_the_variable(
    env: dict[str, str], message: str, capsys: pytest.CaptureFixture[str]
):
    with pytest.raises(SystemExit) as exc:
        parse([], env)
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == f"example: error: {message}"


def test_a_bad_environment_value_stops_evllm_serve_with_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    from tests import inprocess

    monkeypatch.setenv("EVLLM_MAX_REQUEST_BYTES", "lots")
    with pytest.raises(SystemExit) as exc:
        inprocess.settings([])
    assert exc.value.code == 2
    assert capsys.readouterr().err == (
        "evllm serve: error: EVLLM_MAX_REQUEST_BYTES: expected int, got 'lots' (see evllm serve --help)\n"
    )


def test_an_environment_only_value_of_the_wrong_type_is_a_settings_error():
    # No flag, so not argparse's business: `read_settings` turns it into the usage error.
    with pytest.raises(SettingsError) as exc:
        from_namespace(Strict, argparse.Namespace(), {"EVLLM_TIMEOUT": "soon"})
    assert str(exc.value) == "EVLLM_TIMEOUT: expected float, got 'soon'"
    assert from_namespace(Strict, argparse.Namespace(), {"EVLLM_TIMEOUT": "2.5"}).timeout == 2.5
    assert from_namespace(Strict, argparse.Namespace(), {}).timeout == 1.0


def test_a_bad_flag_value_names_the_flag_and_the_value():
    with pytest.raises(argparse.ArgumentError) as exc:
        parse(["--count", "ten"])
    assert "--count" in str(exc.value) and "expected int, got 'ten'" in str(exc.value)
    with pytest.raises(argparse.ArgumentError, match="invalid choice: 'medium'"):
        parse(["--mode", "medium"])
    assert parse(["--mode", "slow"]).mode == "slow"


def test_check_runs_on_the_built_settings():
    with pytest.raises(SettingsError, match="--count must not be negative"):
        parse(["--count", "-1"])


def test_environment_only_fields_have_no_flag():
    parser = argparse.ArgumentParser(prog="example", exit_on_error=False)
    add_arguments(parser, Example, "example", environ={})
    assert "--secret" not in parser.format_help()
    with pytest.raises(SystemExit):  # unrecognized arguments always exit, whatever exit_on_error says
        parser.parse_args(["--secret", "s"])
    assert parse([], {"EVLLM_SECRET": "k1,k2"}).secret == ["k1", "k2"]
    assert parse([]).secret == []


def test_help_shows_the_environment_name_and_the_default():
    parser = argparse.ArgumentParser(prog="example")
    add_arguments(parser, Example, "example", "What the example is.", environ={"EVLLM_COUNT": "7"})
    text = " ".join(parser.format_help().split())
    assert "example: What the example is." in text
    # The documented default, not the environment's value.
    assert "How many. [EVLLM_COUNT; default: 3]" in text
    assert "Names, comma-separated. [EVLLM_NAMES; default: a,b]" in text
    assert "Nothing by default. [EVLLM_EMPTY; default: none]" in text
    assert "An optional limit. [EVLLM_LIMIT; default: unset]" in text
    assert "[K_SINK_EXAMPLE; default: unset]" in text
    assert "--enabled, --no-enabled" in text and "{fast,slow}" in text


def test_env_names_and_declared_fields():
    by_name = {f.name: f for f, _ in fields(Example)}
    assert env_name(by_name["count"]) == "EVLLM_COUNT" and env_name(by_name["sink"]) == "K_SINK_EXAMPLE"
    assert list(by_name) == ["count", "ratio", "enabled", "names", "empty", "limit", "mode", "secret", "sink"]


def test_evllm_serve_help_lists_every_group_with_environment_names():
    text = " ".join(build_parser([Eventing()]).format_help().split())
    for group in ("server:", "limits:", "auth:", "eventing:"):
        assert group in text, group
    for name in (
        "--model_dir", "[EVLLM_MODEL_DIR; default: /mnt/models]",
        "[EVLLM_MAX_REQUEST_BYTES; default: 8388608]",
        "[EVLLM_MAX_CONCURRENT_REQUESTS; default: 128]",
        "EVLLM_API_KEYS", "[EVLLM_AUTH_METRICS; default: False]",
        "[K_SINK; default: unset]", "[EVLLM_STORAGE_ROOTS; default: ./evllm-data]",
        "--max_event_bytes", "--http_port",  # KServe's own flags are there too
    ):  # fmt: skip
        assert name in text, name
    assert "--api_keys " not in text  # environment only


def test_evllm_serve_reads_its_settings_from_the_environment(monkeypatch: pytest.MonkeyPatch):
    from tests import inprocess

    monkeypatch.setenv("EVLLM_MAX_CONCURRENT_REQUESTS", "5")
    monkeypatch.setenv("EVLLM_LOG_FORMAT", "text")
    monkeypatch.setenv("EVLLM_BATCH_CHUNK_SIZE", "9")
    monkeypatch.setenv("K_SINK", "http://broker.test/")
    s: Any = inprocess.settings(["--max_concurrent_requests", "6"], [Eventing()])
    assert s.server.max_concurrent_requests == 6 and s.server.log_format == "text"
    assert (
        s.extensions["eventing"].batch_chunk_size == 9
        and s.extensions["eventing"].sink == "http://broker.test/"
    )

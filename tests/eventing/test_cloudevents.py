"""CloudEvents parsing against the spec's conformance cases, in both HTTP modes (no engine)."""

from __future__ import annotations

import json

import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent

from eventing.events import BadEvent, encode, is_rfc3339, make_event, parse_http

from .fakes import CLOUDEVENTS_CASES as CONFORMANCE


def cases(name: str) -> list[dict]:
    return json.loads((CONFORMANCE / f"{name}-events.json").read_text())["tests"]


VALID = cases("valid")
INVALID = cases("invalid")
STRUCTURED = {"content-type": "application/cloudevents+json"}


def test_conformance_files_are_present() -> None:
    assert len(VALID) >= 10 and len(INVALID) >= 25


@pytest.mark.parametrize("case", VALID, ids=[c["id"] for c in VALID])
def test_valid_conformance_events_parse(case: dict) -> None:
    event = parse_http(STRUCTURED, json.dumps(case["event"]).encode())
    expected = {k: v for k, v in case["event"].items() if v is not None and k not in ("data", "data_base64")}
    assert event.attributes == expected
    assert "time" in event.attributes or "time" not in expected  # no invented timestamps
    assert event.data == case["event"].get("data")


@pytest.mark.parametrize("case", INVALID, ids=[c["id"] for c in INVALID])
def test_invalid_conformance_events_are_rejected(case: dict) -> None:
    with pytest.raises(BadEvent) as info:
        parse_http(STRUCTURED, json.dumps(case["event"]).encode())
    assert info.value.status == 400
    assert info.value.message


def test_binary_mode_round_trip_with_the_sdk() -> None:
    sent = CloudEvent({"type": "t.x", "source": "/s", "id": "1", "subject": "sub", "model": "demo"}, {"a": 1})
    headers, body = to_binary(sent)
    event = parse_http(headers, body)
    assert event.binary
    assert (event.id, event.source, event.type, event.subject) == ("1", "/s", "t.x", "sub")
    assert event.extensions == {"model": "demo"}
    assert event.data == {"a": 1}


def test_structured_mode_round_trip_with_the_sdk() -> None:
    sent = CloudEvent({"type": "t.x", "source": "/s", "id": "1", "model": "demo"}, {"a": [1, 2]})
    headers, body = to_structured(sent)
    event = parse_http(headers, body)
    assert not event.binary and event.data == {"a": [1, 2]} and event.extensions["model"] == "demo"


def test_binary_header_values_are_percent_decoded() -> None:
    headers = {"ce-specversion": "1.0", "ce-id": "a%20b", "ce-source": "/s", "ce-type": "t",
               "content-type": "text/plain"}  # fmt: skip
    event = parse_http(headers, b"hello")
    assert event.id == "a b" and event.data == "hello"


@pytest.mark.parametrize(
    ("headers", "body", "fragment"),
    [
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s"}, b"{}", "ce-type"),
        ({"ce-specversion": "1.0", "ce-id": "", "ce-source": "/s", "ce-type": "t"}, b"", "'id' must not be empty"),
        ({"ce-specversion": "0.3", "ce-id": "1", "ce-source": "/s", "ce-type": "t"}, b"", "specversion"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-time": "noon"}, b"",
         "RFC 3339"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t", "ce-my_ext": "x"}, b"",
         "extension attribute name"),
        ({"ce-specversion": "1.0", "ce-id": "1", "ce-source": "/s", "ce-type": "t",
          "content-type": "application/json"}, b"{not json", "not valid JSON"),
        ({"content-type": "application/json"}, b'{"prompt": "x"}', "not a CloudEvent"),
        ({"content-type": "application/cloudevents+json"}, b"[1]", "JSON object"),
        ({"content-type": "application/cloudevents+json"}, b"{oops", "not valid JSON"),
        ({"content-type": "application/cloudevents-batch+json"}, b"[]", "batched"),
        ({"content-type": "application/cloudevents+json"},
         b'{"specversion":"1.0","id":"1","source":"/s","type":"t","data_base64":"%%%"}', "base64"),
        ({"content-type": "application/cloudevents+json"},
         b'{"specversion":"1.0","id":"1","source":"/s","type":"t","big":4294967296}', "32-bit"),
    ],
)  # fmt: skip
def test_malformed_http_events(headers: dict, body: bytes, fragment: str) -> None:
    with pytest.raises(BadEvent, match=fragment.replace("(", r"\(")):
        parse_http(headers, body)


def test_rfc3339() -> None:
    assert is_rfc3339("2018-04-05T17:31:00Z") and is_rfc3339("2018-04-05t17:31:00.5+23:59")
    assert not is_rfc3339("2018-02-30T17:31:00Z")
    assert not is_rfc3339("2018-04-05T24:00:00Z")


@pytest.mark.parametrize("binary", [True, False])
def test_outgoing_events_parse_back(binary: bool) -> None:
    event = make_event(
        "dev.evllm.x", "/evllm", {"k": "v"}, id_="fixed", subject="s", extensions={"jobid": "j"}
    )
    headers, body = encode(event, binary=binary)
    parsed = parse_http(headers, body)
    assert (parsed.id, parsed.subject, parsed.data, parsed.extensions["jobid"]) == (
        "fixed",
        "s",
        {"k": "v"},
        "j",
    )
    assert is_rfc3339(parsed.attributes["time"])

"""CloudEvents 1.0 over HTTP: parse + validate incoming events, encode outgoing ones.

The cloudevents SDK decodes the wire formats but accepts events the spec calls invalid (empty id,
``time: "lunchtime"``, numeric ids, ``MyExtension``, data + data_base64, ...) and invents a ``time`` when
none was sent, so attributes are validated here, on the raw JSON object (structured mode) or the raw
``ce-*`` headers (binary mode), before the SDK builds the event. Every problem is a `BadEvent` (400).
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

from cloudevents.conversion import to_binary, to_structured
from cloudevents.exceptions import GenericException
from cloudevents.http import CloudEvent, from_http

from predictors.errors import InvalidInput

SPECVERSION = "1.0"
STRUCTURED = "application/cloudevents+json"
BATCHED = "application/cloudevents-batch+json"
CORE = frozenset({"specversion", "id", "source", "type", "datacontenttype", "dataschema", "subject", "time"})
REQUIRED = ("specversion", "id", "source", "type")
EXTENSION_NAME = re.compile(r"^[a-z0-9]+$")
MEDIA_TYPE = re.compile(r"^[A-Za-z0-9!#$&^_.+-]+/[A-Za-z0-9!#$&^_.+-]+(\s*;.*)?$")
RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?(?:([Zz])|([+-])(\d{2}):(\d{2}))$"
)
INT32 = (-(2**31), 2**31 - 1)


class BadEvent(InvalidInput):
    """Not a valid CloudEvent, or one this endpoint cannot take: 400, which Knative does not retry."""


@dataclass(frozen=True)
class Event:
    """A validated CloudEvent: attributes exactly as sent (no invented time), decoded data."""

    attributes: dict[str, Any]
    data: Any = None
    binary: bool = False  # arrived in binary mode: replies use the same mode
    extensions: dict[str, Any] = field(default_factory=dict)

    @property
    def id(self) -> str:
        return str(self.attributes["id"])

    @property
    def source(self) -> str:
        return str(self.attributes["source"])

    @property
    def type(self) -> str:
        return str(self.attributes["type"])

    @property
    def subject(self) -> str | None:
        return self.attributes.get("subject")


def is_rfc3339(value: str) -> bool:
    m = RFC3339.match(value)
    if not m:
        return False
    year, month, day, hour, minute, second = (int(g) for g in m.groups()[:6])
    try:
        dt.date(year, month, day)
    except ValueError:
        return False
    if hour > 23 or minute > 59 or second > 60:  # 60: leap second
        return False
    return not (m.group(8) is None and (int(m.group(10)) > 23 or int(m.group(11)) > 59))


def _check_attribute(name: str, value: Any, *, binary: bool) -> None:
    """Raise BadEvent if ``name: value`` breaks the CloudEvents 1.0 attribute rules."""
    if name in CORE:
        if not isinstance(value, str):
            raise BadEvent(f"CloudEvent attribute {name!r} must be a string, got {type(value).__name__}")
        if value == "":
            raise BadEvent(f"CloudEvent attribute {name!r} must not be empty")
        if name == "specversion" and value != SPECVERSION:
            raise BadEvent(f"unsupported CloudEvents specversion {value!r}: only {SPECVERSION} is accepted")
        if name == "time" and not is_rfc3339(value):
            raise BadEvent(f"CloudEvent attribute 'time' is not an RFC 3339 timestamp: {value!r}")
        if name == "datacontenttype" and not MEDIA_TYPE.match(value):
            raise BadEvent(f"CloudEvent attribute 'datacontenttype' is not an RFC 2046 media type: {value!r}")
        if name == "dataschema" and not urlsplit(value).scheme:
            raise BadEvent(f"CloudEvent attribute 'dataschema' must be an absolute URI: {value!r}")
        return
    if not EXTENSION_NAME.match(name):
        raise BadEvent(
            f"invalid CloudEvent extension attribute name {name!r}: only lower-case letters and digits"
        )
    if binary:
        return  # header values are strings by construction
    if isinstance(value, (bool, str)):
        return
    if isinstance(value, int):
        if not INT32[0] <= value <= INT32[1]:
            raise BadEvent(f"CloudEvent extension {name!r}: integer out of the 32-bit range")
        return
    raise BadEvent(
        f"CloudEvent extension {name!r} must be a string, boolean or integer, got {type(value).__name__}"
    )


def validate_attributes(attrs: Mapping[str, Any], *, binary: bool = False) -> dict[str, Any]:
    """The event's attributes with nulls dropped (null means absent), or BadEvent naming the problem."""
    clean = {k: v for k, v in attrs.items() if v is not None}
    for name in REQUIRED:
        if name not in clean:
            where = f"header ce-{name}" if binary else f"attribute {name!r}"
            raise BadEvent(f"CloudEvent is missing the required {where}")
    for name, value in clean.items():
        _check_attribute(name, value, binary=binary)
    return clean


def validate_structured(obj: Any) -> tuple[dict[str, Any], Any]:
    """Split a structured-mode JSON object into (validated attributes, data)."""
    if not isinstance(obj, dict):
        raise BadEvent("structured CloudEvent must be a JSON object")
    attrs = {k: v for k, v in obj.items() if k not in ("data", "data_base64")}
    attrs = validate_attributes(attrs)
    has_data = obj.get("data") is not None
    has_b64 = obj.get("data_base64") is not None
    if has_data and has_b64:
        raise BadEvent("CloudEvent must not have both 'data' and 'data_base64'")
    if has_b64:
        if not isinstance(obj["data_base64"], str):
            raise BadEvent("CloudEvent 'data_base64' must be a base64 string")
        try:
            return attrs, base64.b64decode(obj["data_base64"], validate=True)
        except (binascii.Error, ValueError):
            raise BadEvent("CloudEvent 'data_base64' is not valid base64") from None
    return attrs, obj.get("data")


def _json_data(content_type: str | None, body: bytes) -> Any:
    """Binary-mode body -> data: JSON media types are decoded (bad JSON is a client error), text stays text."""
    if not body:
        return None
    media = (content_type or "application/json").split(";")[0].strip().lower()
    if media == "application/json" or media.endswith("+json"):
        try:
            return json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise BadEvent(f"event data is not valid JSON: {exc}") from None
    if media.startswith("text/"):
        try:
            return body.decode()
        except UnicodeDecodeError:
            raise BadEvent("event data is not valid UTF-8 text") from None
    return body


def parse_http(headers: Mapping[str, str], body: bytes) -> Event:
    """An HTTP request (binary or structured mode) -> a validated Event, or BadEvent."""
    lower = {k.lower(): v for k, v in headers.items()}
    content_type = lower.get("content-type", "")
    media = content_type.split(";")[0].strip().lower()
    if media == BATCHED:
        raise BadEvent("batched CloudEvents (application/cloudevents-batch+json) are not supported")
    if media != STRUCTURED and "ce-specversion" in lower:
        # Binary mode: attributes are ce-* headers, percent-encoded per the HTTP binding.
        attrs: dict[str, Any] = {k[3:]: unquote(v) for k, v in lower.items() if k.startswith("ce-")}
        if content_type:
            attrs["datacontenttype"] = content_type
        attrs = validate_attributes(attrs, binary=True)
        data = _json_data(content_type, body)
        # The SDK decodes too: it must agree this is an event (it is the reference implementation).
        _sdk_check(headers, body)
        return Event(attrs, data, binary=True, extensions=_extensions(attrs))
    try:
        obj = json.loads(body or b"null")
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        if media == STRUCTURED:
            raise BadEvent(f"structured CloudEvent is not valid JSON: {exc}") from None
        obj = None
    if media != STRUCTURED and not (isinstance(obj, dict) and "specversion" in obj):
        raise BadEvent(
            "not a CloudEvent: send ce-* headers (binary mode) or Content-Type "
            "application/cloudevents+json (structured mode)"
        )
    attrs, data = validate_structured(obj)
    _sdk_check({"content-type": STRUCTURED}, body)
    return Event(attrs, data, binary=False, extensions=_extensions(attrs))


def _sdk_check(headers: Mapping[str, str], body: bytes) -> None:
    try:
        from_http(dict(headers), body)
    except (GenericException, ValueError, TypeError) as exc:
        raise BadEvent(f"invalid CloudEvent: {exc}") from None


def _extensions(attrs: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in attrs.items() if k not in CORE}


def now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat().replace("+00:00", "Z")


def make_event(
    type_: str,
    source: str,
    data: Any,
    *,
    id_: str | None = None,
    subject: str | None = None,
    extensions: Mapping[str, Any] | None = None,
) -> CloudEvent:
    attrs: dict[str, Any] = {
        "specversion": SPECVERSION,
        "id": id_ or uuid.uuid4().hex,
        "source": source,
        "type": type_,
        "time": now(),
        "datacontenttype": "application/json",
    }
    if subject:
        attrs["subject"] = subject
    attrs.update({k: v for k, v in (extensions or {}).items() if v is not None})
    return CloudEvent(attrs, data)


def encode(event: CloudEvent, *, binary: bool = False) -> tuple[dict[str, str], bytes]:
    """(headers, body) for an HTTP request or a reply, in binary or structured mode."""
    headers, body = to_binary(event) if binary else to_structured(event)
    return dict(headers), body if isinstance(body, bytes) else str(body).encode()


def to_json(event: CloudEvent) -> dict[str, Any]:
    """The structured-mode JSON object of ``event``."""
    obj: dict[str, Any] = json.loads(to_structured(event)[1])
    return obj

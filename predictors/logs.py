"""Structured JSON logs: one object per line with the request id, CloudEvent id and W3C traceparent.

The HTTP middleware puts the request's identifiers in a context variable; a logging filter copies them
onto every record logged while that request is handled (by evllm, KServe, uvicorn or vLLM's front end).
Prompts and generated text are never logged at INFO: the access line carries sizes, status and timing.
"""

from __future__ import annotations

import contextvars
import datetime as dt
import json
import logging
import re
from dataclasses import dataclass
from typing import Any

import orjson

access_logger = logging.getLogger("evllm.access")


def access(msg: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
    """One access line, as `access_logger.info(msg, *args, extra=fields)` but without the caller lookup
    (a stack walk per request; the caller is always the HTTP middleware)."""
    if access_logger.isEnabledFor(logging.INFO):
        record = access_logger.makeRecord(
            access_logger.name, logging.INFO, __file__, 0, msg, args, None, "access", fields
        )
        access_logger.handle(record)


@dataclass(frozen=True)
class RequestContext:
    request_id: str | None = None
    ce_id: str | None = None
    traceparent: str | None = None


CONTEXT: contextvars.ContextVar[RequestContext] = contextvars.ContextVar(
    "evllm_request_context",
    default=RequestContext(),  # noqa: B039 (frozen dataclass: immutable)
)

# Identifiers are echoed into logs and headers: keep them short and printable (no log injection).
_SAFE_ID = re.compile(r"^[A-Za-z0-9._:/@+=-]{1,128}$")
_TRACEPARENT = re.compile(r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$")


def safe_id(value: str | None) -> str | None:
    return value if value is not None and _SAFE_ID.match(value) else None


def safe_traceparent(value: str | None) -> str | None:
    return value if value is not None and _TRACEPARENT.match(value) else None


# Standard LogRecord attributes; anything else on a record came from `extra=` and is emitted as a field.
_RESERVED = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "color_message"}


class ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        ctx = CONTEXT.get()
        record.request_id = getattr(record, "request_id", None) or ctx.request_id
        record.ce_id = getattr(record, "ce_id", None) or ctx.ce_id
        record.traceparent = getattr(record, "traceparent", None) or ctx.traceparent
        return True


class JSONFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(
                timespec="milliseconds"
            ),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _RESERVED and value is not None and not key.startswith("_"):
                out[key] = value if isinstance(value, (str, int, float, bool)) else str(value)
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        try:  # orjson halves the cost of the access line every request writes
            return orjson.dumps(out, default=str).decode()
        except TypeError:  # what orjson refuses (an int past 64 bits) still gets logged
            return json.dumps(out, ensure_ascii=False, default=str)


def configure(fmt: str = "json", level: str | None = None) -> None:
    """Put every handler that exists now (root, KServe, uvicorn, vLLM) on the chosen format, add the
    request-context filter, and silence uvicorn's access log (the evllm.access line replaces it)."""
    handlers: set[logging.Handler] = set(logging.getLogger().handlers)
    loggers = [logging.getLogger()] + [
        lg for lg in logging.Logger.manager.loggerDict.values() if isinstance(lg, logging.Logger)
    ]
    for lg in loggers:
        handlers.update(lg.handlers)
    if not logging.getLogger().handlers:
        root_handler = logging.StreamHandler()
        logging.getLogger().addHandler(root_handler)
        handlers.add(root_handler)
    ctx_filter = ContextFilter()
    for h in handlers:
        if fmt == "json":
            h.setFormatter(JSONFormatter())
        if not any(isinstance(f, ContextFilter) for f in h.filters):
            h.addFilter(ctx_filter)
    if level:
        logging.getLogger("evllm").setLevel(level.upper())
    elif logging.getLogger("evllm").level == logging.NOTSET:
        logging.getLogger("evllm").setLevel(logging.INFO)
    logging.getLogger("uvicorn.access").disabled = True

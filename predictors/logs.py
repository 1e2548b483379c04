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
import os
import re
import threading
import time
from dataclasses import dataclass
from typing import Any

import orjson

access_logger = logging.getLogger("evllm.access")


# What `AccessRecord.__init__` sets for each record; the rest of a LogRecord's attributes never change.
_PER_RECORD = frozenset(
    {"msg", "args", "created", "msecs", "relativeCreated", "thread", "threadName", "process"}
)


class AccessRecord(logging.LogRecord):
    """The access line's record. Every request writes one, and under load `LogRecord.__init__` (path
    splitting, thread and process names) was a large part of its cost: what never changes is taken once
    from a stock record. Formatters read a record's `__dict__` (`%`-style), so every attribute is in it."""

    _constant: dict[str, Any] = {
        k: v
        for k, v in vars(
            logging.LogRecord(access_logger.name, logging.INFO, __file__, 0, "", (), None, "access")
        ).items()
        if k not in _PER_RECORD
    }

    def __init__(self, msg: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
        created = time.time()
        self.__dict__.update(self._constant)
        self.msg = msg
        self.args = args
        self.created = created
        self.msecs = int((created - int(created)) * 1000) + 0.0
        self.relativeCreated = (created - _START) * 1000
        self.thread = threading.get_ident()
        self.threadName = threading.current_thread().name
        self.process = os.getpid()
        self.__dict__.update(fields)


_START: float = getattr(logging, "_startTime", time.time())  # what LogRecord counts relativeCreated from


def access(msg: str, args: tuple[Any, ...], fields: dict[str, Any]) -> None:
    """One access line, as `access_logger.info(msg, *args, extra=fields)` without the caller lookup (a
    stack walk per request; the caller is always the HTTP middleware) and with a lighter record."""
    if access_logger.isEnabledFor(logging.INFO):
        access_logger.handle(AccessRecord(msg, args, fields))


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
    _second: tuple[int, str] = (-1, "")  # one tuple, so threads sharing the formatter read a matching pair

    def _time(self, created: float) -> str:
        """ISO 8601 UTC to the millisecond; the text up to the second is reused within that second."""
        second, text = self._second
        if second != int(created):
            second = int(created)
            text = dt.datetime.fromtimestamp(second, dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%S")
            self._second = (second, text)
        micros = round((created - second) * 1_000_000)  # rounded as datetime rounds, then cut to ms
        if micros >= 1_000_000:
            return dt.datetime.fromtimestamp(created, dt.timezone.utc).isoformat(timespec="milliseconds")
        return f"{text}.{micros // 1000:03d}+00:00"

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": self._time(record.created),
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

"""Typed errors, mapped to ``{"error": "..."}`` JSON responses in one place.

Every transport (V1, V2, generate, OpenAI glue, events) raises these; `install_handlers` maps them to
HTTP so a client mistake is a clear 4xx and never a 500.
"""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

logger = logging.getLogger("evllm")


class EvllmError(Exception):
    """Base class: ``status`` is the HTTP status, ``str(exc)`` the message users see."""

    status: int = HTTPStatus.INTERNAL_SERVER_ERROR
    headers: dict[str, str] | None = None

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if headers:
            self.headers = headers


class InvalidInput(EvllmError):
    status = HTTPStatus.BAD_REQUEST


class ValidationFailed(InvalidInput):
    """Input the generate extension rejects: the OIP generate spec answers these with 422."""

    status = HTTPStatus.UNPROCESSABLE_ENTITY


class Unauthorized(EvllmError):
    status = HTTPStatus.UNAUTHORIZED


class ModelNotFound(EvllmError):
    status = HTTPStatus.NOT_FOUND

    def __init__(self, name: str, message: str | None = None):
        super().__init__(message or f"Model with name {name} does not exist.")


class PayloadTooLarge(EvllmError):
    status = HTTPStatus.REQUEST_ENTITY_TOO_LARGE


class Overloaded(EvllmError):
    """Admission limit reached: Knative and clients retry 429 with backoff."""

    status = HTTPStatus.TOO_MANY_REQUESTS

    def __init__(self, message: str = "Model is overloaded, retry later.", retry_after: int = 1):
        super().__init__(message, headers={"Retry-After": str(retry_after)})


class NotReady(EvllmError):
    """Engine starting, draining or dead: 503, so load balancers and Knative retry elsewhere."""

    status = HTTPStatus.SERVICE_UNAVAILABLE


class RouteDisabled(EvllmError):
    """A KServe route this server does not offer (model repository, versions): 404, not KServe's 501."""

    status = HTTPStatus.NOT_FOUND


class EngineStartFailed(Exception):
    """The engine cannot start: ``str(exc)`` is one line naming the cause and the flag to change."""


def from_openai(status: int, body: Any) -> EvllmError:
    """An OpenAI-layer error answer (status + ``{"error": {"message": ...}}``) as the typed error with
    the same meaning: 503 and 429 stay retryable, other 4xx are the client's, the rest the server's."""
    err = body.get("error") if isinstance(body, dict) else None
    if isinstance(err, dict):
        message = str(err.get("message", err))
    else:
        message = err if isinstance(err, str) else str(body)
    if status == HTTPStatus.SERVICE_UNAVAILABLE:
        return NotReady(message)
    if status == HTTPStatus.TOO_MANY_REQUESTS:
        return Overloaded(message)
    if status == HTTPStatus.NOT_FOUND:
        return ModelNotFound("", message)
    if 400 <= status < 500:
        return InvalidInput(message)
    return EvllmError(message)


def error_response(exc: EvllmError) -> JSONResponse:
    return JSONResponse({"error": exc.message}, status_code=int(exc.status), headers=exc.headers)


async def _evllm_error(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, EvllmError)
    if exc.status >= 500:
        logger.warning("%s: %s", type(exc).__name__, exc.message)
    return error_response(exc)


def describe_validation(errors: Any) -> str:
    """Pydantic's (FastAPI's) validation errors as one line naming each location."""
    parts = []
    for err in errors:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        parts.append(f"{loc or 'body'}: {err.get('msg', 'invalid')}")
    return "; ".join(parts) or "invalid request"


async def _request_validation(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return JSONResponse({"error": describe_validation(exc.errors())}, status_code=HTTPStatus.BAD_REQUEST)


async def _http_exception(_: Request, exc: Exception) -> JSONResponse:
    """Starlette's own errors (404 for an unknown path, 400 for a body it cannot read) in the same shape."""
    assert isinstance(exc, StarletteHTTPException)
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code, headers=exc.headers)


async def _model_not_ready(_: Request, exc: Exception) -> JSONResponse:
    """Not ready is a normal state while the engine starts (kubelet polls /v2/models/{m}/ready every few
    seconds through it): a 503 and a debug line, where KServe logs an ERROR with a traceback per poll."""
    logger.debug("not ready: %s", exc)
    return JSONResponse({"error": str(exc)}, status_code=HTTPStatus.SERVICE_UNAVAILABLE)


def quiet_not_ready(app: FastAPI) -> None:
    """Replace KServe's ModelNotReady handler; call after KServe registered its handlers."""
    from kserve.errors import ModelNotReady as KServeModelNotReady

    app.add_exception_handler(KServeModelNotReady, _model_not_ready)


def install_handlers(app: FastAPI) -> None:
    """Map evllm's and FastAPI's request errors to JSON; kserve maps its own in the same shape."""
    app.add_exception_handler(EvllmError, _evllm_error)
    app.add_exception_handler(RequestValidationError, _request_validation)
    app.add_exception_handler(StarletteHTTPException, _http_exception)

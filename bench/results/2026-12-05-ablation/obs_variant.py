"""`predictors.middleware.Observe` as of 64d5eeb, with parts that can be left out (OBS, a comma list):
`noscope` (no X-Request-Id injected into the request's headers), `nohdr` (none added to the response),
`noctx` (no context variables set), `nometrics` (no in-flight, duration or request-count update),
`nolog` (no access line), `nosend` (the response's messages are not wrapped). For `ablate.py`."""

import os
import time
import uuid

from predictors import logs, metrics
from predictors import middleware as M

F = set(filter(None, os.environ.get("OBS", "").split(",")))


class Observe:
    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = M._headers(scope, M._OBSERVED)
        request_id = logs.safe_id(headers.get("x-request-id"))
        if request_id is None:
            request_id = uuid.uuid4().hex
            if "noscope" not in F:
                scope = {
                    **scope,
                    "headers": [
                        *((k, v) for k, v in scope["headers"] if k.lower() != b"x-request-id"),
                        (b"x-request-id", request_id.encode()),
                    ],
                }
        if "noctx" not in F:
            ctx = logs.RequestContext(
                request_id=request_id,
                ce_id=logs.safe_id(headers.get("ce-id")),
                traceparent=logs.safe_traceparent(headers.get("traceparent")),
            )
            token = logs.CONTEXT.set(ctx)
            proto_token = metrics.PROTOCOL.set(metrics.protocol_of(scope["method"], scope["path"]))
        protocol = metrics.protocol_of(scope["method"], scope["path"])
        model = metrics.model()
        used = metrics.RequestModel(model)
        if "noctx" not in F:
            model_token = metrics.REQUEST_MODEL.set(used)
        start = time.monotonic()
        status = 500
        sent = 0
        started = False

        async def observed_send(message):
            nonlocal status, sent, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                if "nohdr" not in F:
                    message = {
                        **message,
                        "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())],
                    }
            elif message["type"] == "http.response.body":
                sent += len(message.get("body", b""))
            await send(message)

        if "nometrics" not in F:
            in_flight = metrics.child(metrics.IN_FLIGHT, model, protocol)
            in_flight.inc()
        try:
            await self.app(scope, receive, observed_send if "nosend" not in F else send)
        finally:
            elapsed = time.monotonic() - start
            if "nometrics" not in F:
                in_flight.dec()
                metrics.child(metrics.REQUEST_DURATION, used.name, protocol).observe(elapsed)
                metrics.child(metrics.REQUESTS, used.name, protocol, str(status)).inc()
            if "nolog" not in F:
                logs.access(
                    "%s %s %d",
                    (scope["method"], scope["path"], status),
                    {
                        "method": scope["method"],
                        "path": scope["path"],
                        "status": status,
                        "protocol": protocol,
                        "duration_ms": round(elapsed * 1000, 2),
                        "response_bytes": sent,
                        "client": (scope.get("client") or ("", 0))[0],
                    },
                )
            if "noctx" not in F:
                metrics.REQUEST_MODEL.reset(model_token)
                metrics.PROTOCOL.reset(proto_token)
                logs.CONTEXT.reset(token)

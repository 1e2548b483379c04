"""What every OIP V2 transport (REST and gRPC) says about the server and its one model: the model's
version, and the version-qualified paths the spec writes (`/v2/models/{m}/versions/{v}/...`)."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import Any
from urllib.parse import parse_qsl, urlencode

# The one version of the one model (Triton's default version directory is "1"): versioned paths and
# `model_version` arguments naming it are the unversioned routes; any other version is a 404.
MODEL_VERSION = "1"
# The OIP extensions this server implements (KServe's model repository extension is disabled).
EXTENSIONS = ["generate"]

_VERSIONED = re.compile(r"^(/v2/models/[^/]+)/versions/([^/]+)(/infer|/ready|/generate|/generate_stream)?$")


class UnknownVersion(Exception):
    def __init__(self, version: str):
        super().__init__(
            f"model version {version} does not exist: this server serves version {MODEL_VERSION}"
        )


def unversioned(path: str, query: bytes) -> tuple[str, bytes]:
    """The unversioned route a V2 path (and its query string) means; UnknownVersion if it names another
    version. `/v2/` (the spec's spelling of server metadata) is `/v2`."""
    if path == "/v2/":
        return "/v2", query
    m = _VERSIONED.match(path)
    if m is not None:
        if m.group(2) != MODEL_VERSION:
            raise UnknownVersion(m.group(2))
        path = m.group(1) + (m.group(3) or "")
    if path.startswith("/v2/models/") and b"model_version=" in query:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        for key, value in pairs:
            if key == "model_version" and value not in ("", MODEL_VERSION):
                raise UnknownVersion(value)
        query = urlencode([(k, v) for k, v in pairs if k != "model_version"]).encode("latin-1")
    return path, query


def without_nulls(app: Any) -> None:
    """KServe's V2 REST routes answer through pydantic models whose unset optional fields serialize as
    `null` (`"model_version": null`, `"parameters": null`), which the spec's schemas do not allow: leave
    them out, as the spec's examples do."""
    from fastapi.routing import APIRoute, request_response

    for route in app.routes:
        if (
            isinstance(route, APIRoute)
            and route.path.startswith("/v2")
            and not route.response_model_exclude_none
        ):
            route.response_model_exclude_none = True
            route.app = request_response(route.get_route_handler())


def add_lean_route(api: Any, path: str, endpoint: Callable[[str, Any], Awaitable[Any]]) -> None:
    """A hot V2 POST route `endpoint(model_name, request)` behind Starlette's plain request/response
    wrapper: FastAPI's per-request dependency solving was about a third of evllm's own per-request cost
    (in-process, fake engine: 416 -> ~275 us per V2 generate). Such a route is not in the OpenAPI schema."""

    async def handle(request: Any) -> Any:
        return await endpoint(request.path_params["model_name"], request)

    api.add_route(path, handle, methods=["POST"], include_in_schema=False)

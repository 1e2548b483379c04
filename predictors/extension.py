"""The server's extension point: what a package built on predictors adds (eventing adds ``/events``).

predictors knows nothing of what an extension does; it only learns, per extension, which settings to
parse (one flag group), which routes to attach, and how its own middleware should treat those routes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from fastapi import FastAPI

    from .dataplane import DataPlane


@dataclass(frozen=True)
class RoutePolicy:
    """How the server's middleware treats one extension path."""

    path: str
    protocol: str  # the `protocol` label of its metrics
    max_body_bytes: int | None = None  # None: --max_request_bytes
    online: bool = True  # counts as online load, which background work backs off from


class Extension(Protocol):
    title: str  # its flag group's title in `evllm serve --help`
    description: str
    settings: type[Any]  # a dataclass of `predictors.settings.setting` fields
    protocols: tuple[str, ...]  # labels for work not tied to one of its paths (set through metrics.PROTOCOL)

    def policies(self, settings: Any) -> list[RoutePolicy]: ...

    def attach(self, app: FastAPI, dataplane: DataPlane, settings: Any) -> None:
        """Add routes (and their startup/shutdown work) to the app."""
        ...


@dataclass(frozen=True)
class Policies:
    """Every extension's route policies, looked up by exact path on each request."""

    by_path: dict[str, RoutePolicy]

    @classmethod
    def of(cls, policies: list[RoutePolicy]) -> Policies:
        return cls({p.path: p for p in policies})

    def get(self, path: str) -> RoutePolicy | None:
        return self.by_path.get(path)

"""eventing.dataplane.DataPlaneView: the real data plane and the tests' fake both have its shape.

Eventing is handed the server's DataPlane as ``Any`` (predictors knows nothing of eventing), so no type
checker compares the two: these tests do, member by member and call signature by call signature.
"""

from __future__ import annotations

import asyncio
import inspect
from typing import Any

import pytest

from eventing.dataplane import DataPlaneView
from predictors.dataplane import DataPlane
from tests import inprocess

from .fakes import FakeDataPlane

METHODS = ("online", "model_names", "generate", "openai_call")
PROPERTIES = ("online_load", "ready")


def shape(fn: Any) -> list[tuple[str, Any, Any]]:
    """A callable's parameters without their annotations: name, kind, default."""
    return [(p.name, p.kind, p.default) for p in inspect.signature(fn).parameters.values()]


def real_dataplane() -> DataPlane:
    return DataPlane(inprocess.FakeEngine(), "demo", openai=inprocess.FakeOpenAI())  # type: ignore[arg-type]


def test_the_view_names_what_eventing_uses() -> None:
    members = {n for n in vars(DataPlaneView) if not n.startswith("_")}
    assert members == {*METHODS, *PROPERTIES}
    assert set(DataPlaneView.__annotations__) == {"model_name", "online_changed"}


@pytest.mark.parametrize("make", [real_dataplane, FakeDataPlane], ids=["DataPlane", "FakeDataPlane"])
def test_dataplane_has_the_views_shape(make: Any) -> None:
    async def main() -> None:
        dp = make()
        cls = type(dp)
        for name in METHODS:
            assert shape(getattr(cls, name)) == shape(getattr(DataPlaneView, name)), name
        assert inspect.iscoroutinefunction(cls.generate) and inspect.iscoroutinefunction(cls.openai_call)
        assert isinstance(dp.model_name, str) and isinstance(dp.online_changed, asyncio.Event)
        assert dp.online_load == 0 and isinstance(dp.ready, bool)
        with dp.online():
            assert dp.online_load == 1 and dp.online_changed.is_set()
        assert dp.online_load == 0

    asyncio.run(main())


def test_ready_follows_the_engine() -> None:
    async def main() -> None:
        dp = real_dataplane()
        assert dp.ready is False  # still starting
        await dp.start()
        assert dp.ready is True
        dp.engine.fake.errored = True  # type: ignore[attr-defined]
        assert dp.ready is False

    asyncio.run(main())

"""Typed errors and their HTTP answers; engine start failures explained in one line."""

from __future__ import annotations

import argparse
import asyncio
from types import SimpleNamespace

import httpx
import pytest
from fastapi import FastAPI
from pydantic import BaseModel

from predictors.engine import Engine, explain_start_failure
from predictors.errors import (
    EngineStartFailed,
    EvllmError,
    InvalidInput,
    ModelNotFound,
    NotReady,
    Overloaded,
    PayloadTooLarge,
    RouteDisabled,
    Unauthorized,
    ValidationFailed,
    from_openai,
    install_handlers,
)


@pytest.mark.parametrize(
    ("status", "body", "kind", "message"),
    [
        (
            503,
            {"error": {"message": "engine busy", "type": "ServiceUnavailableError"}},
            NotReady,
            "engine busy",
        ),
        (429, {"error": {"message": "slow down"}}, Overloaded, "slow down"),
        (
            404,
            {"error": {"message": "The model `x` does not exist."}},
            ModelNotFound,
            "The model `x` does not exist.",
        ),
        (400, {"error": {"message": "bad prompt", "code": 400}}, InvalidInput, "bad prompt"),
        (422, {"error": {"message": "unprocessable"}}, InvalidInput, "unprocessable"),
        (413, {"error": {"message": "too long"}}, InvalidInput, "too long"),
        (500, {"error": {"message": "kaput"}}, EvllmError, "kaput"),
        (400, {"error": {"type": "NoMessage"}}, InvalidInput, "{'type': 'NoMessage'}"),
        (502, "not json", EvllmError, "not json"),
    ],
)
def test_openai_errors_keep_their_meaning(status: int, body: object, kind: type, message: str):
    err = from_openai(status, body)
    assert type(err) is kind and err.message == message
    # Retryable stays retryable; the client's mistakes stay the client's.
    expected = {503: 503, 429: 429, 404: 404}.get(status, 400 if 400 <= status < 500 else 500)
    assert err.status == expected
    if kind is Overloaded:
        assert err.headers == {"Retry-After": "1"}


class Body(BaseModel):
    n: int


def test_every_error_is_a_json_answer_with_its_status():
    app = FastAPI()
    install_handlers(app)
    errors: dict[str, EvllmError] = {
        "invalid": InvalidInput("bad"),
        "validation": ValidationFailed("unprocessable"),
        "unauthorized": Unauthorized("who are you"),
        "missing": ModelNotFound("nope"),
        "large": PayloadTooLarge("too big"),
        "overloaded": Overloaded(retry_after=4),
        "starting": NotReady("starting"),
        "disabled": RouteDisabled("not here"),
        "internal": EvllmError("kaput"),
    }

    @app.get("/raise/{name}")
    async def raise_(name: str) -> None:
        raise errors[name]

    @app.post("/typed")
    async def typed(body: Body) -> dict[str, int]:
        return {"n": body.n}

    async def main() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            answers = {name: await c.get(f"/raise/{name}") for name in errors}
            assert {name: r.status_code for name, r in answers.items()} == {
                "invalid": 400, "validation": 422, "unauthorized": 401, "missing": 404, "large": 413,
                "overloaded": 429, "starting": 503, "disabled": 404, "internal": 500,
            }  # fmt: skip
            assert answers["missing"].json() == {"error": "Model with name nope does not exist."}
            assert answers["overloaded"].json() == {"error": "Model is overloaded, retry later."}
            assert answers["overloaded"].headers["retry-after"] == "4"
            r = await c.post("/typed", json={"n": "x"})
            assert r.status_code == 400 and r.json()["error"].startswith("n: ")
            r = await c.post("/typed", content=b"{")
            assert r.status_code == 400 and isinstance(r.json()["error"], str)

    asyncio.run(main())


# Engine start failures -> one line naming the flag ------------------------------------------------------
@pytest.mark.parametrize(
    ("exc", "expected"),
    [
        (
            RuntimeError("Engine core initialization failed. See root cause above. Failed core proc(s): {}"),
            "the engine process failed during startup (its error is logged above); memory is the usual "
            "cause on CPU: set --kv-cache-memory-bytes or lower --max-model-len",
        ),
        (
            ValueError("Not enough  memory\nfor the KV cache"),
            "Not enough memory for the KV cache (change --kv-cache-memory-bytes (or VLLM_CPU_KVCACHE_SPACE in GiB))",
        ),
        (
            ValueError("max_model_len (9999) is greater than the derived max_model_len (2048)"),
            "max_model_len (9999) is greater than the derived max_model_len (2048) (change --max-model-len)",
        ),
        (
            OSError("/models/x does not appear to have a file named config.json"),
            "/models/x does not appear to have a file named config.json (change --model_dir)",
        ),
        (ValueError("dtype float8 is not supported"), "dtype float8 is not supported (change --dtype)"),
        (RuntimeError("something else"), "something else"),
        (RuntimeError(), "RuntimeError"),
    ],
)
def test_start_failures_name_the_flag_to_change(exc: BaseException, expected: str):
    assert explain_start_failure(exc) == expected


def test_start_failure_explanations_are_one_bounded_line():
    assert explain_start_failure(EngineStartFailed("lower --max-model-len")) == "lower --max-model-len"
    long = explain_start_failure(RuntimeError("x" * 1000 + "\n" + "y" * 10))
    assert "\n" not in long and len(long) == 400


def test_engine_readiness_states():
    engine = Engine(argparse.Namespace(model="m"), frozenset({"--max-model-len"}))
    assert engine.explicit_flags == {"--max-model-len"}
    assert not engine.ready and not engine.dead
    with pytest.raises(NotReady, match="starting"):
        engine.check_ready()
    engine.client = SimpleNamespace(errored=False)
    assert engine.ready and not engine.dead
    engine.check_ready()
    engine.draining = True
    assert not engine.ready and not engine.dead
    with pytest.raises(NotReady, match="shutting down"):
        engine.check_ready()
    engine.client.errored = True
    assert not engine.ready and engine.dead
    with pytest.raises(NotReady, match="dead"):
        engine.check_ready()

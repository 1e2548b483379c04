"""Composition root: parse flags, build the engine + data plane + routes, start KServe's ModelServer.

The only module in `predictors` that imports `eventing` (dependencies point one way).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import Any

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from .admission import Admission
from .dataplane import DataPlane
from .engine import Engine
from .errors import install_handlers

logger = logging.getLogger("evllm.server")

DEFAULT_MODEL_DIR = "/mnt/models"


def kserve_parser() -> argparse.ArgumentParser:
    """KServe's own ModelServer flags (--model_name, --http_port, ...) plus evllm's and eventing's."""
    from kserve.model_server import parser as kserve_flags

    import eventing.config

    parser = argparse.ArgumentParser(
        prog="evllm serve",
        parents=[kserve_flags],
        description="Serve one model on one vLLM engine through OIP V2, generate, KServe V1, OpenAI and "
        "CloudEvents. Every `vllm serve` engine flag (kebab-case, e.g. --max-model-len 4096, "
        "--tensor-parallel-size 4) is passed through to the engine.",
    )
    parser.add_argument(
        "--model_dir",
        default=None,
        help=f"Model directory or Hugging Face id (default {DEFAULT_MODEL_DIR}; when that does not exist, "
        "the generated demo model).",
    )
    # gRPC is not part of this server's contract; KServe enables it by default on 8081.
    parser.set_defaults(enable_grpc=False)
    eventing.config.add_arguments(parser)
    from . import admission, auth, limits, logs, shutdown

    auth.add_arguments(parser)
    limits.add_arguments(parser)
    admission.add_arguments(parser)
    shutdown.add_arguments(parser)
    logs.add_arguments(parser)
    return parser


def vllm_parser() -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="evllm serve (engine flags)"))


def resolve_model_dir(model_dir: str | None) -> str:
    if model_dir:
        return model_dir
    if Path(DEFAULT_MODEL_DIR).is_dir() and any(Path(DEFAULT_MODEL_DIR).iterdir()):
        return DEFAULT_MODEL_DIR
    from .demo_model import ensure_demo_model

    path = ensure_demo_model()
    logger.info(
        "no model given and %s is empty: serving the generated demo model %s", DEFAULT_MODEL_DIR, path
    )
    return str(path)


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.Namespace]:
    """Split argv into KServe/evllm flags and vLLM engine flags, the way each project spells them."""
    kargs, rest = kserve_parser().parse_known_args(argv)
    vparser = vllm_parser()
    vargs = vparser.parse_args(rest)
    if vargs.model_tag is not None:
        vparser.error(f"unexpected positional argument {vargs.model_tag!r}; use --model_dir")
    vargs.model = resolve_model_dir(kargs.model_dir)
    vargs.served_model_name = [kargs.model_name]
    # Batch chunks run below online traffic on the same engine: that needs priority scheduling.
    if not any(a.startswith("--scheduling-policy") for a in rest):
        vargs.scheduling_policy = "priority"
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    validate_parsed_serve_args(vargs)
    return kargs, vargs


def health_router(dataplane: DataPlane) -> APIRouter:
    """OIP health: live fails once the engine is dead (so the kubelet restarts us); ready only once the
    engine can generate. Registered before kserve's routes, which would answer ready=true regardless."""
    api = APIRouter()

    @api.get("/v2/health/live")
    async def live() -> JSONResponse:
        if dataplane.engine.dead:
            return JSONResponse({"live": False, "error": "engine is dead"}, status_code=503)
        return JSONResponse({"live": True})

    @api.get("/v2/health/ready")
    async def ready() -> JSONResponse:
        if not dataplane.ready:
            return JSONResponse({"ready": False}, status_code=503)
        return JSONResponse({"ready": True})

    return api


def attach_routes(app: FastAPI, dataplane: DataPlane, kargs: argparse.Namespace) -> Admission:
    """Routes, error handlers and middleware on KServe's app; returns the admission controller (which the
    graceful shutdown drains)."""
    import eventing.routes

    from . import generate, metrics
    from .auth import AuthConfig, Authenticator
    from .limits import Limits
    from .middleware import (
        AbortOnDisconnect,
        Admit,
        Authenticate,
        BodyLimit,
        JSONByDefault,
        Observe,
        OnlineLoad,
    )

    limits = Limits.from_args(kargs)
    admission = Admission(kargs.max_concurrent_requests, kargs.retry_after_seconds)
    authenticator = Authenticator(AuthConfig.from_args(kargs))
    metrics.init(dataplane.model_name, admission.limit)
    # Shared with the eventing package (batch lines per job, event size) and the data plane's checks.
    app.state.evllm_limits = dataplane.limits = limits
    app.state.evllm_admission = admission
    dataplane.engine_hooks.append(
        lambda client: setattr(
            client, "generate", metrics.instrument_generate(client.generate, limits.engine_check)
        )
    )

    install_handlers(app)
    app.include_router(health_router(dataplane))
    app.include_router(generate.router(dataplane))
    app.mount("/openai", dataplane.openai.app)
    eventing.routes.attach(app, dataplane, kargs)
    install_openapi(app, dataplane.openai.app)
    # add_middleware wraps what is there: the last added runs first.
    app.add_middleware(AbortOnDisconnect)
    app.add_middleware(JSONByDefault)
    app.add_middleware(OnlineLoad, dataplane=dataplane)
    app.add_middleware(Admit, admission=admission)
    app.add_middleware(BodyLimit, limits=limits)
    app.add_middleware(Authenticate, authenticator=authenticator)
    app.add_middleware(Observe)
    if authenticator.enabled:
        logger.info("authentication required on every route but health/readiness")
    return admission


def install_openapi(app: FastAPI, openai_app: FastAPI) -> None:
    """``/openapi.json`` describes every route, the mounted OpenAI sub-app included (FastAPI leaves mounts
    out), so clients and the fuzz tests see the whole surface. /events is described by its CloudEvents
    catalog instead. KServe's model-repository routes are disabled (see middleware.Admit)."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is not None:
            return app.openapi_schema
        schema = build()
        schema["paths"] = {p: v for p, v in schema["paths"].items() if not p.startswith("/v2/repository/")}
        sub = openai_app.openapi()
        for path, item in sub.get("paths", {}).items():
            schema["paths"]["/openai" + path] = item
        schema.setdefault("components", {}).setdefault("schemas", {}).update(
            sub.get("components", {}).get("schemas", {})
        )
        app.openapi_schema = schema
        return schema

    app.openapi = openapi  # type: ignore[method-assign]


def _lean_kserve_app(event_loop: str) -> None:
    """Two per-request costs KServe adds that `vllm serve` does not have (profiled under load, where the
    API server shares the CPUs with the engine):

    - timing_asgi's TimingMiddleware calls getrusage twice per request (~9% of the server's samples)
      only to feed a debug trace log; evllm's own latency metrics replace it.
    - ModelServer.start() runs uvicorn inside asyncio.run(), so uvicorn's --event-loop choice never
      applies: install uvloop's policy first, as vllm serve runs on uvloop ("auto" or "uvloop").
    """
    from kserve.protocol.rest.server import RESTServer

    add_middlewares = RESTServer._add_middlewares

    def without_timing(self: Any, app: FastAPI) -> None:
        add_middlewares(self, app)
        app.user_middleware = [m for m in app.user_middleware if m.cls.__name__ != "TimingMiddleware"]

    RESTServer._add_middlewares = without_timing  # type: ignore[method-assign]
    if event_loop in ("auto", "uvloop"):
        try:
            import uvloop
        except ImportError:
            if event_loop == "uvloop":
                raise
        else:
            import asyncio

            asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
            # kserve's setup_event_loop() asks for the current loop before asyncio.run() makes its own.
            asyncio.set_event_loop(asyncio.new_event_loop())


def serve(argv: list[str]) -> None:
    from kserve import ModelServer
    from kserve.model_server import app

    from . import logs
    from .model import EvllmModel
    from .shutdown import GracefulShutdown

    kargs, vargs = parse_args(argv)
    logs.configure(kargs.log_format)
    dataplane = DataPlane(Engine(vargs), kargs.model_name)
    model = EvllmModel(kargs.model_name, dataplane)
    admission = attach_routes(app, dataplane, kargs)
    graceful = GracefulShutdown(admission, dataplane.engine, kargs.grace_period, kargs.drain_seconds)

    class Server(ModelServer):
        def register_signal_handler(self) -> None:
            super().register_signal_handler()
            # uvicorn installs its own handle_exit while serving: drain before it runs.
            if self._rest_server is not None:
                graceful.install(self._rest_server._server)

    _lean_kserve_app(kargs.event_loop)
    Server(
        http_port=kargs.http_port,
        workers=1,  # one engine per process: uvicorn workers would each need their own
        enable_grpc=kargs.enable_grpc,
        grpc_port=kargs.grpc_port,
        enable_docs_url=kargs.enable_docs_url,
        # uvicorn's own wait for connections after the drain; the drain already used up to grace_period.
        grace_period=max(int(kargs.grace_period), 1),
    ).start([model])


def main(argv: list[str] | None = None) -> None:
    from vllm.entrypoints.serve.utils.api_utils import cli_env_setup

    cli_env_setup()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    serve(sys.argv[1:] if argv is None else argv)

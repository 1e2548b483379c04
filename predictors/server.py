"""The predictor server: flags, engine, data plane, routes and middleware on KServe's ModelServer.

Extensions (see `extension.Extension`) add their own settings and routes; this module never names one.
The composition root (`evllm.cli`) decides which extensions a server carries.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

from fastapi import APIRouter, FastAPI
from fastapi.responses import JSONResponse

from . import settings as settings_lib
from .admission import Admission
from .auth import AuthConfig
from .config import DEMO, ServerConfig
from .dataplane import DataPlane
from .engine import Engine, explain_start_failure
from .errors import EngineStartFailed, install_handlers, quiet_not_ready
from .extension import Extension, Policies
from .limits import Limits
from .oip import without_nulls

logger = logging.getLogger("evllm.server")

# KServe flags evllm decides itself: one engine per process (uvicorn workers would each need their own).
FIXED_KSERVE_FLAGS = {"workers": 1}


@dataclass
class Settings:
    """Everything `evllm serve` was told, parsed once."""

    kserve: argparse.Namespace  # KServe's ModelServer flags (--model_name, --http_port, ...)
    server: ServerConfig
    limits: Limits
    auth: AuthConfig
    engine: argparse.Namespace  # vLLM's engine flags
    engine_flags: frozenset[str] = frozenset()  # the engine flags given on the command line
    extensions: dict[str, Any] = field(default_factory=dict)  # each extension's settings, by title


PROG = "evllm serve"


def usage_error(message: str) -> NoReturn:
    """One line per mistake, exit 2: the full usage of ~60 flags would bury it (`--help` shows them)."""
    sys.stderr.write(f"{PROG}: error: {message} (see {PROG} --help)\n")
    sys.exit(2)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        usage_error(message)


def build_parser(extensions: Sequence[Extension] = ()) -> argparse.ArgumentParser:
    """KServe's own ModelServer flags plus evllm's and each extension's, one group per concern."""
    from kserve.model_server import parser as kserve_flags

    parser = _Parser(
        prog=PROG,
        parents=[kserve_flags],
        allow_abbrev=False,  # --api_keys must not become --api_keys_file, nor --max_tokens --max_tokens_limit
        description="Serve one model on one vLLM engine through OIP V2, generate, KServe V1 and OpenAI"
        + "".join(f", {e.title}" for e in extensions)
        + ". Every flag below can also be set as an environment variable (shown in brackets). Every "
        "`vllm serve` engine flag (kebab-case, e.g. --max-model-len 4096, --tensor-parallel-size 4) is "
        "passed through to the engine.",
    )
    # gRPC (OIP V2 + Triton's ModelStreamInfer, predictors/oip_grpc.py) only when asked for: KServe
    # enables it by default on 8081, and Knative routes one port per container (see README).
    parser.set_defaults(enable_grpc=False)
    settings_lib.add_arguments(parser, ServerConfig, "server", "Model, logging, admission and shutdown")
    settings_lib.add_arguments(
        parser, Limits, "limits", "Request limits (400/413 with a JSON error past them)"
    )
    settings_lib.add_arguments(
        parser,
        AuthConfig,
        "auth",
        "Authentication (off unless configured; health and readiness stay open). API keys come from "
        "EVLLM_API_KEYS (comma-separated; environment only, a flag would show in `ps`).",
    )
    for ext in extensions:
        settings_lib.add_arguments(parser, ext.settings, ext.title, ext.description)
    return parser


def _vllm_parser() -> Any:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    return make_arg_parser(FlexibleArgumentParser(prog="evllm serve (engine flags)"))


def _is_local(model_dir: str) -> bool:
    return model_dir.startswith(("/", ".", "~")) or Path(model_dir).exists()


def resolve_model(config: ServerConfig) -> str:
    """The model vLLM loads: the demo model only when asked for, a local directory only when it holds
    something (an empty /mnt/models would otherwise start with random weights), else a hub id."""
    if config.model_dir == DEMO:
        from .demo_model import demo_dir, ensure_demo_model

        path = ensure_demo_model(demo_dir(config.cache_dir))
        logger.info("serving the generated demo model %s", path)
        return str(path)
    if _is_local(config.model_dir):
        path = Path(config.model_dir).expanduser()
        if not path.is_dir() or not any(path.iterdir()):
            raise EngineStartFailed(
                f"--model_dir {config.model_dir}: no model there (missing or empty directory); give a model "
                f"directory or Hugging Face id, or --model_dir {DEMO} for the demo model"
            )
        return str(path)
    return config.model_dir


def _flag_names(argv: Sequence[str]) -> frozenset[str]:
    return frozenset(a.split("=", 1)[0].replace("_", "-") for a in argv if a.startswith("--"))


def read_settings(
    parser: argparse.ArgumentParser, kargs: argparse.Namespace, extensions: Sequence[Extension] = ()
) -> Settings:
    """evllm's and the extensions' settings from parsed flags (engine flags are filled in later)."""
    for name, value in FIXED_KSERVE_FLAGS.items():
        if getattr(kargs, name) != value:
            parser.error(
                f"--{name} {getattr(kargs, name)}: evllm runs one engine per process, so --{name} is "
                f"always {value}; scale with replicas (Knative) instead"
            )
    try:
        return Settings(
            kserve=kargs,
            server=settings_lib.from_namespace(ServerConfig, kargs),
            limits=settings_lib.from_namespace(Limits, kargs),
            auth=settings_lib.from_namespace(AuthConfig, kargs),
            engine=argparse.Namespace(),
            extensions={e.title: settings_lib.from_namespace(e.settings, kargs) for e in extensions},
        )
    except settings_lib.SettingsError as exc:
        parser.error(str(exc))


def parse_args(
    argv: Sequence[str],
    extensions: Sequence[Extension] = (),
    before_vllm: Callable[[Settings], None] | None = None,
) -> Settings:
    """Split argv into KServe/evllm flags and vLLM engine flags, the way each project spells them.
    ``before_vllm`` runs once evllm's own settings are known, before vLLM (and Hugging Face's libraries,
    which read their environment when imported) is imported to parse the engine flags."""
    parser = build_parser(extensions)
    kargs, rest = parser.parse_known_args(list(argv))
    settings = read_settings(parser, kargs, extensions)
    if before_vllm is not None:
        before_vllm(settings)
    # Before vLLM's parser: a missing model is refused without importing vLLM (~10 s).
    try:
        model = resolve_model(settings.server)
    except EngineStartFailed as exc:
        parser.error(str(exc))
    vparser = _vllm_parser()
    vparser.error = parser.error  # one line, not vLLM's usage of ~200 flags
    vargs = vparser.parse_args(rest)
    if vargs.api_key:
        parser.error(
            "--api-key is vllm serve's and would guard only the OpenAI routes; evllm authenticates every "
            "protocol: set EVLLM_API_KEYS or --api_keys_file"
        )
    if vargs.model_tag is not None:
        vparser.error(f"unexpected positional argument {vargs.model_tag!r}; use --model_dir")
    vargs.model = model
    vargs.served_model_name = [kargs.model_name]
    if vargs.enable_lora:
        _fix_cpu_lora(vargs)
    if vargs.lora_modules:
        if not vargs.enable_lora:
            parser.error("--lora-modules needs --enable-lora")
        from .adapters import BadAdapter, resolve_static

        try:
            resolve_static(vargs.lora_modules, settings.server.cache_dir, vargs.max_lora_rank, model)
        except BadAdapter as exc:
            parser.error(f"--lora-modules: {exc.message}")
    # Background work (batch) runs below online traffic on the same engine: that needs priorities.
    if not any(a.startswith("--scheduling-policy") for a in rest):
        vargs.scheduling_policy = "priority"
    from vllm.entrypoints.launchers.cli_args import validate_parsed_serve_args

    validate_parsed_serve_args(vargs)
    settings.engine, settings.engine_flags = vargs, _flag_names(rest)
    return settings


def _fix_cpu_lora(vargs: argparse.Namespace) -> None:
    """On CPU, load evllm's fix for vLLM's CPU LoRA kernels into the engine (see predictors.cpu_lora)."""
    from vllm.platforms import current_platform

    from .cpu_lora import QUALNAME

    if not current_platform.is_cpu():
        return
    if vargs.worker_extension_cls and vargs.worker_extension_cls != QUALNAME:
        logger.warning(
            "--worker-extension-cls %s replaces evllm's CPU LoRA fix: base-model requests batched with "
            "adapter requests may be generated through an adapter (predictors/cpu_lora.py)",
            vargs.worker_extension_cls,
        )
        return
    vargs.worker_extension_cls = QUALNAME


def health_router(dataplane: DataPlane) -> APIRouter:
    """OIP health: live fails once the engine is dead (so the kubelet restarts us); ready only once the
    engine can generate. Registered before kserve's routes, which would answer ready=true regardless."""
    # Out of /openapi.json: KServe's routes document the same paths (ours shadow them, same shapes).
    api = APIRouter(include_in_schema=False)

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


def assemble(
    app: FastAPI, dataplane: DataPlane, settings: Settings, extensions: Sequence[Extension] = ()
) -> Admission:
    """Routes, error handlers and middleware on an app that carries KServe's V1/V2 routes; returns the
    admission controller (which the graceful shutdown drains)."""
    from . import adapters, generate, infer, metrics
    from .auth import Authenticator
    from .middleware import (
        AbortOnDisconnect,
        Admit,
        Authenticate,
        BodyLimit,
        JSONByDefault,
        Observe,
        OnlineLoad,
    )
    from .openai import StartedGate

    policies = Policies.of([p for e in extensions for p in e.policies(settings.extensions[e.title])])
    admission = Admission(settings.server.max_concurrent_requests, settings.server.retry_after_seconds)
    authenticator = Authenticator(settings.auth)
    metrics.init(
        dataplane.model_name,
        admission.limit,
        {p.path: p.protocol for p in policies.by_path.values()},
        tuple(proto for e in extensions for proto in e.protocols),
        tuple(dataplane.engine.static_adapters()),
    )
    dataplane.adapter_hooks.append(metrics.add_model)
    limits = dataplane.limits = settings.limits
    dataplane.engine_hooks.append(
        lambda client: setattr(
            client, "generate", metrics.instrument_generate(client.generate, limits.engine_check)
        )
    )

    install_handlers(app)
    # The hot routes first: Starlette tries routes in order until one matches.
    app.include_router(infer.router(dataplane))
    app.include_router(generate.router(dataplane))
    app.include_router(health_router(dataplane))
    # Before the OpenAI mount, which would otherwise take these paths.
    app.include_router(adapters.router(adapters.Adapters(dataplane, settings.server.cache_dir)))
    app.mount("/openai", StartedGate(dataplane.openai.app, dataplane.check_ready))
    for ext in extensions:
        ext.attach(app, dataplane, settings.extensions[ext.title])
    install_openapi(app, dataplane.openai.app)
    # add_middleware wraps what is there: the last added runs first.
    app.add_middleware(AbortOnDisconnect)
    app.add_middleware(JSONByDefault)
    app.add_middleware(OnlineLoad, dataplane=dataplane, policies=policies)
    app.add_middleware(Admit, admission=admission)
    app.add_middleware(BodyLimit, limits=limits, policies=policies)
    app.add_middleware(Authenticate, authenticator=authenticator)
    app.add_middleware(Observe)
    if authenticator.enabled:
        logger.info("authentication required on every route but health/readiness")
    return admission


def install_openapi(app: FastAPI, openai_app: FastAPI) -> None:
    """``/openapi.json`` describes every route, the mounted OpenAI sub-app included (FastAPI leaves mounts
    out), so clients and the fuzz tests see the whole surface. KServe's model-repository routes are
    disabled (see middleware.Admit)."""
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
    """KServe's app, adjusted: its V2 routes answer without nulls (oip.without_nulls), its ModelNotReady handler logs an ERROR with a traceback on every readiness
    poll during a start (quiet_not_ready), and two per-request costs KServe adds that `vllm serve` does
    not have (profiled under load, where the API server shares the CPUs with the engine):

    - timing_asgi's TimingMiddleware calls getrusage twice per request (~9% of the server's samples)
      only to feed a debug trace log; evllm's own latency metrics replace it.
    - ModelServer.start() runs uvicorn inside asyncio.run(), so uvicorn's --event-loop choice never
      applies: install uvloop's policy first, as vllm serve runs on uvloop ("auto" or "uvloop").
    """
    from kserve.protocol.rest.server import RESTServer

    add_middlewares = RESTServer._add_middlewares

    def without_timing(self: Any, app: FastAPI) -> None:
        add_middlewares(self, app)
        app.user_middleware = [
            m for m in app.user_middleware if getattr(m.cls, "__name__", "") != "TimingMiddleware"
        ]

    RESTServer._add_middlewares = without_timing
    add_handlers = RESTServer._add_exception_handlers

    def with_quiet_not_ready(self: Any, app: FastAPI) -> None:
        add_handlers(self, app)
        quiet_not_ready(app)

    RESTServer._add_exception_handlers = with_quiet_not_ready
    register_endpoints = RESTServer._register_endpoints

    def spec_shaped(self: Any, app: FastAPI) -> None:
        register_endpoints(self, app)
        without_nulls(app)

    RESTServer._register_endpoints = spec_shaped
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


def use_caches(settings: Settings) -> None:
    """vLLM's compile cache and Hugging Face downloads under --cache_dir (see compile_cache)."""
    from . import compile_cache

    compile_cache.use(settings.server.cache_dir)


def serve(argv: Sequence[str], extensions: Sequence[Extension] = ()) -> None:
    import time

    from kserve import ModelServer
    from kserve.model_server import app

    from . import logs
    from .model import EvllmModel, Repository, oip_metadata, strict_decode
    from .shutdown import GracefulShutdown
    from .startup import Timeline

    imported = time.time()
    settings = parse_args(argv, extensions, use_caches)
    logs.configure(settings.server.log_format)
    timeline = Timeline(settings.kserve.model_name)
    timeline.end("imports", imported)
    engine = Engine(settings.engine, settings.engine_flags, timeline)
    dataplane = DataPlane(engine, settings.kserve.model_name)
    model = EvllmModel(settings.kserve.model_name, dataplane)
    try:
        admission = assemble(app, dataplane, settings, extensions)
    except settings_lib.SettingsError as exc:
        usage_error(str(exc))
    graceful = GracefulShutdown(
        admission, dataplane.engine, settings.server.grace_period, settings.server.drain_seconds
    )
    kargs = settings.kserve

    class Server(ModelServer):  # type: ignore[misc]  # KServe ships no types
        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            strict_decode(self.dataplane)
            oip_metadata(self.dataplane)

        def register_signal_handler(self) -> None:
            super().register_signal_handler()
            # uvicorn installs its own handle_exit while serving: drain before it runs.
            if self._rest_server is not None:
                graceful.install(self._rest_server._server)

    _lean_kserve_app(kargs.event_loop)
    if kargs.enable_grpc:
        import kserve.model_server

        from .auth import Authenticator
        from .oip_grpc import kserve_grpc_server

        kserve.model_server.GRPCServer = kserve_grpc_server(
            dataplane, admission, Authenticator(settings.auth)
        )
    try:
        Server(
            registered_models=Repository(dataplane),
            http_port=kargs.http_port,
            workers=1,
            enable_grpc=kargs.enable_grpc,
            grpc_port=kargs.grpc_port,
            enable_docs_url=kargs.enable_docs_url,
            # uvicorn's own wait for connections after the drain; the drain already used up to grace_period.
            grace_period=max(int(settings.server.grace_period), 1),
        ).start([model])
    except Exception as exc:
        if dataplane.engine.client is not None:
            raise
        # The engine never came up: one line with the cause and the flag, after vLLM's own traceback.
        print(f"evllm serve: engine failed to start: {explain_start_failure(exc)}", file=sys.stderr)
        sys.exit(1)


def setup_environment() -> None:
    """What `vllm serve` sets up (vllm.entrypoints.serve.utils.api_utils.cli_env_setup), without importing
    vLLM before the flags are parsed: `--help` and usage errors answer in a second."""
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def main(argv: Sequence[str] | None = None, extensions: Sequence[Extension] = ()) -> None:
    setup_environment()
    serve(sys.argv[1:] if argv is None else argv, extensions)

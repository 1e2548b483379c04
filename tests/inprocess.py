"""The real server, in-process and engine-free: `predictors.server.assemble` over a fake engine.

Everything but the engine is the production code: KServe's own V1/V2 routes and error handlers, evllm's
middleware (auth, limits, admission, logs, metrics), the data plane, the generate router and any
extension (eventing's /events). The fake engine stands in for vLLM's AsyncLLM: one token per character,
the prompt echoed back upper-cased (lower-cased through a LoRA adapter), so tests can predict every
output and limit. With ``lora=True`` the names live in vLLM's real `OpenAIServingModels` over the fake. Tests that need the
real engine (token-exact output, disconnect aborts, kill/restart, SIGTERM) use the session server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from predictors.dataplane import DataPlane
from predictors.engine import Engine
from predictors.errors import InvalidInput, quiet_not_ready
from predictors.extension import Extension
from predictors.model import EvllmModel, Repository, oip_metadata, strict_decode
from predictors.oip import without_nulls
from predictors.server import Settings, assemble, build_parser, read_settings

MODEL_NAME = "demo"
MAX_MODEL_LEN = 64


@dataclass
class FakeCompletion:
    text: str
    token_ids: list[int]
    finish_reason: str | None
    stop_reason: Any = None
    logprobs: list[dict[int, Any]] | None = None
    cumulative_logprob: float | None = None


def fake_logprob(i: int) -> float:
    """The fake engine's logprob for the i-th generated token (exact in binary floating point)."""
    return -(i + 1) / 8


@dataclass
class FakeOutput:
    outputs: list[FakeCompletion]
    prompt_token_ids: list[int]
    finished: bool


@dataclass
class FakeClient:
    """AsyncLLM's surface the server uses: generate, errored, model_config."""

    delay: float = 0.0  # seconds per generated token
    errored: bool = False
    requests: list[str] = field(default_factory=list)  # request ids, in submission order
    priorities: list[int] = field(default_factory=list)
    loras: list[str | None] = field(default_factory=list)  # each request's adapter (None: base)
    added: list[str] = field(default_factory=list)  # adapter paths add_lora was given
    renderer: Any = None
    input_processor: Any = None
    aborted: list[str] = field(default_factory=list)  # consumers that went away before the end
    model_config: Any = field(
        default_factory=lambda: SimpleNamespace(
            max_model_len=MAX_MODEL_LEN, get_diff_sampling_param=lambda: {}
        )
    )

    async def add_lora(self, lora_request: Any) -> bool:
        """What vLLM's engine refuses: a directory without adapter_config.json."""
        import os

        if not os.path.isfile(os.path.join(lora_request.lora_path, "adapter_config.json")):
            raise ValueError(f"Loading lora {lora_request.lora_name} failed: no adapter_config.json")
        self.added.append(lora_request.lora_path)
        return True

    async def generate(
        self,
        prompt: Any,
        sampling_params: Any,
        request_id: str,
        *,
        priority: int = 0,
        lora_request: Any = None,
        **_: Any,
    ) -> AsyncIterator[FakeOutput]:
        from vllm.sampling_params import RequestOutputKind

        ids = list(prompt["prompt_token_ids"])
        text = "".join(chr(i) for i in ids)
        text = text.lower() if lora_request is not None else text.upper()
        self.loras.append(None if lora_request is None else lora_request.lora_name)
        n = min(sampling_params.max_tokens or len(text), len(text))
        finish = "length" if n < len(text) else "stop"
        self.requests.append(request_id)
        self.priorities.append(priority)
        delta = sampling_params.output_kind == RequestOutputKind.DELTA
        want = sampling_params.logprobs is not None

        def logprobs(start: int, stop: int) -> Any:
            from vllm.logprobs import Logprob

            if not want:
                return None, None
            lps = [{ord(text[i]): Logprob(fake_logprob(i), 1, text[i])} for i in range(start, stop)]
            return lps, sum(fake_logprob(i) for i in range(stop))

        done = False
        try:
            for i in range(n):
                if self.delay:
                    await asyncio.sleep(self.delay)
                last = i == n - 1
                if delta:
                    c = FakeCompletion(text[i], [ord(text[i])], finish if last else None)
                    c.logprobs, c.cumulative_logprob = logprobs(i, i + 1)
                    yield FakeOutput([c], ids, last)
                elif last:
                    c = FakeCompletion(text[:n], [ord(c) for c in text[:n]], finish)
                    c.logprobs, c.cumulative_logprob = logprobs(0, n)
                    yield FakeOutput([c], ids, True)
            done = True
        finally:
            if not done:
                self.aborted.append(request_id)


class FakeEngine(Engine):
    """`Engine` with the AsyncLLM replaced: readiness, draining and the hooks are the real ones."""

    def __init__(self, *, delay: float = 0.0, lora: bool = False, lora_modules: Sequence[Any] = ()):
        super().__init__(
            argparse.Namespace(
                model="fake", enable_lora=lora, max_lora_rank=8, lora_modules=list(lora_modules) or None
            )
        )
        self.fake = FakeClient(delay=delay)

    async def start(self) -> None:
        self.client = self.fake

    async def tokenize(self, texts: list[str], max_tokens: int = 0) -> list[Any]:
        out = []
        for t in texts:
            ids = [ord(c) for c in t]
            if len(ids) + max_tokens > MAX_MODEL_LEN:
                raise InvalidInput(
                    f"This model's maximum context length is {MAX_MODEL_LEN} tokens; the prompt has "
                    f"{len(ids)} and max_tokens is {max_tokens}"
                )
            out.append({"prompt_token_ids": ids})
        return out


class FakeOpenAI:
    """`OpenAIServer`'s surface: an ASGI sub-app and in-process calls (vLLM's serving classes need an
    engine; their own behaviour is tested against the session server)."""

    def __init__(self, engine: FakeEngine | None = None) -> None:
        self.calls: list[tuple[str, Any, int]] = []
        self.app = FastAPI(openapi_url=None)
        self.engine = engine
        self.models: Any = None  # vLLM's OpenAIServingModels over the fake client, once started

        @self.app.post("/v1/completions")
        async def completions(request: Request) -> JSONResponse:
            status, body = await self.call("/v1/completions", await request.json())
            return JSONResponse(body, status_code=status)

        @self.app.post("/v1/chat/completions")
        async def chat(request: Request) -> JSONResponse:
            status, body = await self.call("/v1/chat/completions", await request.json())
            return JSONResponse(body, status_code=status)

    async def start(self) -> None:
        """vLLM's own registry of names (base + adapters), as `OpenAIServer.start` builds it."""
        if self.engine is None:
            return
        from vllm.entrypoints.openai.models.protocol import BaseModelPath
        from vllm.entrypoints.openai.models.serving import OpenAIServingModels

        self.models = OpenAIServingModels(
            self.engine.client,
            [BaseModelPath(name=MODEL_NAME, model_path="fake")],
            lora_modules=self.engine.args.lora_modules,
        )
        await self.models.init_static_loras()

    def serving_models(self) -> Any:
        return self.models

    async def call(self, url: str, body: Any, *, priority: int = 0) -> tuple[int, dict[str, Any]]:
        self.calls.append((url, body, priority))
        if not isinstance(body, dict) or body.get("prompt") == "bad":
            return 400, {"error": {"message": "bad prompt", "type": "BadRequestError", "code": 400}}
        if self.models is not None and body.get("model") not in (
            None,
            *self.models.lora_requests,
            MODEL_NAME,
        ):
            message = f"The model `{body.get('model')}` does not exist."
            return 404, {"error": {"message": message, "type": "NotFoundError", "code": 404}}
        if url == "/v1/chat/completions":
            text = str(body["messages"][-1]["content"]).upper()
            return 200, {
                "object": "chat.completion",
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                             "finish_reason": "length"}],
                "usage": {"prompt_tokens": len(text), "completion_tokens": len(text)},
            }  # fmt: skip
        return 200, {"object": "text_completion", "choices": [{"text": str(body.get("prompt", "")).upper()}]}


def settings(argv: Sequence[str] = (), extensions: Sequence[Extension] = ()) -> Settings:
    """Settings exactly as `evllm serve` parses its own flags (engine flags are the engine's business)."""
    parser = build_parser(extensions)
    return read_settings(parser, parser.parse_args(["--model_name", MODEL_NAME, *argv]), extensions)


def kserve_routes(app: FastAPI, model: EvllmModel) -> SimpleNamespace:
    """KServe's own V1/V2 routes and exception handlers, registered the way its RESTServer does, on the
    repository predictors.server gives KServe."""
    from kserve.protocol.dataplane import DataPlane as KServeDataPlane
    from kserve.protocol.model_repository_extension import ModelRepositoryExtension
    from kserve.protocol.rest.server import RESTServer

    repository = Repository(model.dataplane)
    repository.update(model)
    kserve_dataplane = KServeDataPlane(model_registry=repository)
    strict_decode(kserve_dataplane)  # as predictors.server's ModelServer does
    oip_metadata(kserve_dataplane)
    kserve = SimpleNamespace(
        dataplane=kserve_dataplane,
        model_repository_extension=ModelRepositoryExtension(model_registry=repository),
    )
    RESTServer._register_endpoints(kserve, app)
    without_nulls(app)  # as predictors.server does after KServe's routes
    RESTServer._add_exception_handlers(kserve, app)
    quiet_not_ready(app)  # as predictors.server does after KServe's handlers
    return kserve


@dataclass
class InProcess:
    app: FastAPI
    dataplane: DataPlane
    engine: FakeEngine
    openai: FakeOpenAI
    admission: Any
    settings: Settings
    kserve: SimpleNamespace  # KServe's data plane and repository extension (what its gRPC servicer takes)

    def client(self, **kwargs: Any) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=self.app)
        return httpx.AsyncClient(transport=transport, base_url="http://predictor", **kwargs)


@contextlib.asynccontextmanager
async def server(
    argv: Sequence[str] = (),
    *,
    extensions: Sequence[Extension] = (),
    delay: float = 0.0,
    start: bool = True,
    lora: bool = False,
    lora_modules: Sequence[Any] = (),
) -> AsyncIterator[InProcess]:
    """The assembled app over a fake engine; ``start=False`` leaves the engine "starting" (503s).
    ``lora``: `--enable-lora` (names in vLLM's registry); ``lora_modules``: `--lora-modules`' paths."""
    s = settings(argv, extensions)
    engine = FakeEngine(delay=delay, lora=lora, lora_modules=lora_modules)
    openai = FakeOpenAI(engine if lora else None)
    dataplane = DataPlane(engine, MODEL_NAME, openai=openai)  # type: ignore[arg-type]
    app = FastAPI()
    model = EvllmModel(MODEL_NAME, dataplane)
    admission = assemble(app, dataplane, s, extensions)
    kserve = kserve_routes(app, model)
    if start:
        await dataplane.start()
    async with app.router.lifespan_context(app):
        yield InProcess(app, dataplane, engine, openai, admission, s, kserve)

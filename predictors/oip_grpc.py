"""OIP V2 over gRPC: KServe's `GRPCInferenceService` servicer (its protobufs and decoding), answering from
the same data plane as HTTP, plus Triton's `ModelStreamInfer` (the bidirectional stream decoupled models
use) for streaming generation.

What HTTP's middleware does for every request is done here per call: authentication (the same API keys
or JWTs, from the call's metadata), admission (the same limit), online-load accounting. Errors are gRPC
statuses: a client's mistake INVALID_ARGUMENT, unknown model NOT_FOUND, starting/draining UNAVAILABLE,
overloaded RESOURCE_EXHAUSTED; on the stream, an error ends only its request, in Triton's
`error_message`.

KServe's proto has no ModelStreamInfer; Triton's (the same `inference` package, wire-compatible)
declares `ModelStreamInferResponse {string error_message = 1; ModelInferResponse infer_response = 2}`,
encoded here by hand rather than vendoring Triton's generated code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Iterator
from http import HTTPStatus
from typing import Any

import grpc
from kserve.protocol.grpc import grpc_predict_v2_pb2 as pb
from kserve.protocol.grpc.grpc_predict_v2_pb2_grpc import add_GRPCInferenceServiceServicer_to_server
from kserve.protocol.grpc.servicer import InferenceServicer
from kserve.protocol.infer_type import InferRequest, InferResponse, to_http_parameters

from .admission import Admission
from .auth import Authenticator
from .dataplane import DataPlane
from .errors import EvllmError, InvalidInput, ModelNotFound
from .infer import V2Request, infer_outputs, infer_v2, v2_request
from .oip import MODEL_VERSION

logger = logging.getLogger("evllm.grpc")

SERVICE = "inference.GRPCInferenceService"
STATUS = {
    HTTPStatus.BAD_REQUEST: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.UNPROCESSABLE_ENTITY: grpc.StatusCode.INVALID_ARGUMENT,
    HTTPStatus.UNAUTHORIZED: grpc.StatusCode.UNAUTHENTICATED,
    HTTPStatus.NOT_FOUND: grpc.StatusCode.NOT_FOUND,
    HTTPStatus.REQUEST_ENTITY_TOO_LARGE: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.TOO_MANY_REQUESTS: grpc.StatusCode.RESOURCE_EXHAUSTED,
    HTTPStatus.SERVICE_UNAVAILABLE: grpc.StatusCode.UNAVAILABLE,
}


def status_of(exc: Exception) -> tuple[grpc.StatusCode, str]:
    if isinstance(exc, EvllmError):
        return STATUS.get(HTTPStatus(exc.status), grpc.StatusCode.INTERNAL), exc.message
    from kserve.errors import InvalidInput as KServeInvalidInput
    from kserve.errors import ModelNotFound as KServeModelNotFound

    if isinstance(exc, KServeInvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT, str(exc.reason)
    if isinstance(exc, KServeModelNotFound):
        return grpc.StatusCode.NOT_FOUND, str(exc.reason)
    logger.exception("gRPC call failed", exc_info=exc)
    return grpc.StatusCode.INTERNAL, f"inference failed: {type(exc).__name__}"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def stream_response(response: pb.ModelInferResponse | None = None, error: str = "") -> bytes:
    """Triton's ModelStreamInferResponse, serialized."""
    out = _field(1, error.encode()) if error else b""
    if response is not None:
        out += _field(2, response.SerializeToString())
    return out


class Servicer(InferenceServicer):  # type: ignore[misc]  # KServe ships no types
    def __init__(
        self,
        kserve_dataplane: Any,
        repository: Any,
        dataplane: DataPlane,
        admission: Admission,
        authenticator: Authenticator,
    ):
        super().__init__(kserve_dataplane, repository)
        self.dataplane = dataplane
        self.admission = admission
        self.authenticator = authenticator

    # Per call -------------------------------------------------------------------------------------
    def _authenticate(self, context: Any) -> None:
        if self.authenticator.enabled:
            self.authenticator.check({k.lower(): v for k, v in context.invocation_metadata() or ()})

    def _model(self, name: str, version: str) -> None:
        if name != self.dataplane.model_name:
            raise ModelNotFound(name)
        if version not in ("", MODEL_VERSION):
            raise ModelNotFound(name, f"model version {version} does not exist: this server serves version 1")

    @contextlib.contextmanager
    def _admitted(self) -> Iterator[None]:
        with self.admission.admit(), self.dataplane.online():
            yield

    def _request(self, request: pb.ModelInferRequest) -> InferRequest:
        self._model(request.model_name, request.model_version)
        try:
            self.validate_grpc_request(request)
            infer_request = InferRequest.from_grpc(request)
            infer_request.parameters = to_http_parameters(request.parameters) if request.parameters else None
        except EvllmError:
            raise
        except Exception as exc:
            raise InvalidInput(f"cannot decode the request: {exc}") from None
        return infer_request

    # Health and metadata: the engine's state, as over HTTP ----------------------------------------
    async def ServerLive(self, request: Any, context: Any) -> pb.ServerLiveResponse:
        return pb.ServerLiveResponse(live=not self.dataplane.engine.dead)

    async def ServerReady(self, request: Any, context: Any) -> pb.ServerReadyResponse:
        return pb.ServerReadyResponse(ready=self.dataplane.ready)

    async def ModelReady(self, request: pb.ModelReadyRequest, context: Any) -> pb.ModelReadyResponse:
        try:
            self._model(request.name, request.version)
        except EvllmError as exc:
            await context.abort(*status_of(exc))
        return pb.ModelReadyResponse(ready=self.dataplane.ready)

    async def ModelMetadata(self, request: pb.ModelMetadataRequest, context: Any) -> pb.ModelMetadataResponse:
        try:
            self._authenticate(context)
            self._model(request.name, request.version)
        except EvllmError as exc:
            await context.abort(*status_of(exc))
        metadata = await self._data_plane.model_metadata(model_name=request.name)
        return pb.ModelMetadataResponse(
            name=metadata["name"],
            versions=metadata.get("versions") or [],
            platform=metadata["platform"],
            inputs=metadata["inputs"],
            outputs=metadata["outputs"],
        )

    async def RepositoryModelLoad(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the model repository extension is disabled")

    async def RepositoryModelUnload(self, request: Any, context: Any) -> Any:
        await context.abort(grpc.StatusCode.UNIMPLEMENTED, "the model repository extension is disabled")

    # Inference ------------------------------------------------------------------------------------
    async def ModelInfer(self, request: pb.ModelInferRequest, context: Any) -> pb.ModelInferResponse:
        try:
            self._authenticate(context)
            with self._admitted():
                response = await infer_v2(self.dataplane, self._request(request), None, raw_outputs=True)
        except Exception as exc:
            await context.abort(*status_of(exc))
        response.id = request.id
        return response.to_grpc()

    async def _answers(self, request: pb.ModelInferRequest) -> AsyncIterator[pb.ModelInferResponse]:
        """One request on the stream: deltas when its `stream` tensor is true (Triton's decoupled
        responses), else one response."""
        r = v2_request(self._request(request))

        def response(outputs: list[Any]) -> pb.ModelInferResponse:
            answer = InferResponse(
                request.id,
                self.dataplane.model_name,
                outputs,
                model_version=MODEL_VERSION,
                use_binary_outputs=True,
            )
            return answer.to_grpc()

        with self._admitted():
            if not r.options.stream:
                gens = await self.dataplane.generate_many(r.prompts, r.params, logprobs=r.logprobs)
                yield response(infer_outputs(r, gens))
                return
            async for outputs in await self._deltas(r):
                yield response(outputs)

    async def _deltas(self, r: V2Request) -> AsyncIterator[list[Any]]:
        if len(r.prompts) != 1:
            raise InvalidInput(f"streaming takes one prompt per request, got {len(r.prompts)}")
        r.options.check(streaming=True)
        deltas = await self.dataplane.prepare_stream(r.prompts[0], r.params, logprobs=r.logprobs)

        async def outputs() -> AsyncIterator[list[Any]]:
            total = 0
            async for d in deltas:
                total += len(d.token_ids)
                final = d.finish_reason is not None
                yield infer_outputs(r, [d], final=final, completion_tokens=[total])  # type: ignore[list-item]

        return outputs()

    async def ModelStreamInfer(
        self, requests: AsyncIterator[pb.ModelInferRequest], context: Any
    ) -> AsyncIterator[bytes]:
        try:
            self._authenticate(context)
        except EvllmError as exc:
            await context.abort(*status_of(exc))
        queue: asyncio.Queue[bytes | None] = asyncio.Queue()
        tasks: set[asyncio.Task[None]] = set()

        async def one(request: pb.ModelInferRequest) -> None:
            try:
                async for answer in self._answers(request):
                    await queue.put(stream_response(answer))
            except Exception as exc:
                _, message = status_of(exc)
                await queue.put(stream_response(pb.ModelInferResponse(id=request.id), error=message))

        async def read() -> None:
            try:
                async for request in requests:
                    tasks.add(asyncio.ensure_future(one(request)))
                await asyncio.gather(*tasks)
            finally:
                await queue.put(None)

        reader = asyncio.ensure_future(read())
        try:
            while (item := await queue.get()) is not None:
                yield item
        finally:
            # The client went away (or the stream ended): abort what is still generating.
            for task in (reader, *tasks):
                task.cancel()


def serve_on(server: Any, servicer: Servicer) -> None:
    """Register the service (KServe's methods and ModelStreamInfer) on a grpc.aio server."""
    add_GRPCInferenceServiceServicer_to_server(servicer, server)
    stream = grpc.stream_stream_rpc_method_handler(
        servicer.ModelStreamInfer,
        request_deserializer=pb.ModelInferRequest.FromString,
        response_serializer=lambda b: b,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE, {"ModelStreamInfer": stream}),)
    )


def kserve_grpc_server(dataplane: DataPlane, admission: Admission, authenticator: Authenticator) -> type:
    """KServe's GRPCServer (what `ModelServer` starts with `--enable_grpc true` on `--grpc_port`, on the
    HTTP server's event loop) serving this module's servicer instead of KServe's."""
    from kserve.protocol.grpc.server import GRPCServer

    class Server(GRPCServer):  # type: ignore[misc]  # KServe ships no types
        async def start(self, max_workers: int) -> None:
            options = [
                (name, self._kwargs.get(key))
                for name, key in (
                    ("grpc.max_send_message_length", "grpc_max_send_message_length"),
                    ("grpc.max_receive_message_length", "grpc_max_receive_message_length"),
                )
                if self._kwargs.get(key) is not None
            ]
            self._server = grpc.aio.server(options=options)
            servicer = Servicer(
                self._data_plane, self._model_repository_extension, dataplane, admission, authenticator
            )
            serve_on(self._server, servicer)
            self._server.add_insecure_port(f"[::]:{self._port}")
            logger.info("gRPC (OIP V2 + ModelStreamInfer) on port %s", self._port)
            await self._server.start()
            await self._server.wait_for_termination()

    return Server

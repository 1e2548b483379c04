"""The KServe model: registers with kserve's ModelServer and answers V1 predict and V2 infer."""

from __future__ import annotations

import logging
from typing import Any

import kserve
from kserve.protocol.infer_type import InferRequest

from .dataplane import DataPlane
from .infer import INPUTS, OUTPUTS, infer_v2, predict_v1
from .oip import EXTENSIONS, MODEL_VERSION

logger = logging.getLogger("evllm.model")


def strict_decode(kserve_dataplane: Any) -> None:
    """KServe decodes V2 requests (binary tensors included) before the model sees them, and garbage (a
    header that is not an infer request, a wrong BYTES length prefix) escapes as a 500: make every
    decoding failure the client's 400, in KServe's own error shape."""
    from kserve.errors import InvalidInput as KServeInvalidInput

    decode = kserve_dataplane.decode

    def checked(*args: Any, **kwargs: Any) -> Any:
        try:
            return decode(*args, **kwargs)
        except KServeInvalidInput:
            raise
        except Exception as exc:
            raise KServeInvalidInput(f"cannot decode the request: {exc}") from None

    kserve_dataplane.decode = checked


def oip_metadata(kserve_dataplane: Any) -> None:
    """Server and model metadata that say what this server is: the extensions it implements (KServe
    lists its model repository extension, which is disabled here) and the model's one version (KServe
    answers `"versions": null`; the spec wants an array of strings)."""
    model_metadata = kserve_dataplane.model_metadata
    server_metadata = kserve_dataplane.metadata

    async def with_versions(model_name: str) -> dict[str, Any]:
        return {**await model_metadata(model_name), "versions": [MODEL_VERSION]}

    def with_extensions() -> dict[str, Any]:
        return {**server_metadata(), "extensions": list(EXTENSIONS)}

    kserve_dataplane.model_metadata = with_versions
    kserve_dataplane.metadata = with_extensions


class EvllmModel(kserve.Model):  # type: ignore[misc]  # KServe ships no types
    def __init__(self, name: str, dataplane: DataPlane):
        super().__init__(name)
        self.dataplane = dataplane
        # kserve starts `start_engine()` beside the HTTP server, so liveness answers during engine start.
        self.engine = True
        # Registered as loaded; readiness comes from the engine (see healthy()).
        self.ready = True

    def load(self) -> bool:
        return self.ready

    async def start_engine(self) -> None:
        await self.dataplane.start()

    def stop_engine(self) -> None:
        self.dataplane.engine.draining = True

    async def healthy(self) -> bool:
        return self.dataplane.ready

    def get_input_types(self) -> list[dict[str, Any]]:
        return INPUTS

    def get_output_types(self) -> list[dict[str, Any]]:
        return OUTPUTS

    async def predict(
        self, payload: Any, headers: dict[str, str] | None = None, response_headers: Any = None
    ) -> Any:
        request_id = (headers or {}).get("x-request-id")
        if isinstance(payload, InferRequest):
            return await infer_v2(self.dataplane, payload, request_id)
        return await predict_v1(self.dataplane, payload, request_id)

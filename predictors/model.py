"""The KServe model: registers with kserve's ModelServer and answers V1 predict and V2 infer.

KServe routes V1/V2 requests by model name through its `ModelRepository`; `Repository` resolves the names
of the engine's LoRA adapters there too (a view of the same model per adapter), from the data plane's
registry, so an adapter loaded or unloaded at runtime is served or refused without registering anything.
"""

from __future__ import annotations

import logging
from typing import Any

import kserve
from kserve.model_repository import ModelRepository
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
    def __init__(self, name: str, dataplane: DataPlane, *, adapter: bool = False):
        super().__init__(name)
        self.dataplane = dataplane
        self.adapter = adapter  # a view of the base model through one of its LoRA adapters
        # kserve starts `start_engine()` beside the HTTP server, so liveness answers during engine start.
        self.engine = True
        # Registered as loaded; readiness comes from the engine (see healthy()).
        self.ready = True

    def load(self) -> bool:
        return self.ready

    async def start_engine(self) -> None:
        from vllm.utils.gc_utils import freeze_gc_heap

        await self.dataplane.start()
        # As vllm serve does once started: the startup heap (torch, transformers, vLLM: millions of
        # objects) leaves the collector's view, so full collections under load stop walking it
        # (py-spy --native, V2 generate at c=16: ~12% of the API server's samples in gc_collect_main).
        freeze_gc_heap()

    def stop_engine(self) -> None:
        if not self.adapter:
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
            return await infer_v2(self.dataplane, payload, request_id, self.name)
        return await predict_v1(self.dataplane, payload, request_id, self.name)


class Repository(ModelRepository):  # type: ignore[misc]  # KServe ships no types
    """KServe's model repository with the base model registered and its adapters resolved by name: an
    unknown name is evllm's 404 naming the served models (KServe's would name none)."""

    def __init__(self, dataplane: DataPlane):
        super().__init__()
        self.dataplane = dataplane
        self._views: dict[str, EvllmModel] = {}  # bounded: names that were served

    def get_model(self, name: str) -> EvllmModel:
        model = self.models.get(name)
        if model is not None:
            return model  # type: ignore[no-any-return]
        self.dataplane.check_model(name)
        if name not in self._views:
            self._views[name] = EvllmModel(name, self.dataplane, adapter=True)
        return self._views[name]

    def get_models(self) -> dict[str, Any]:
        """The base model and its adapters (KServe's V1/V2 model listings)."""
        models: dict[str, Any] = {name: self.get_model(name) for name in self.dataplane.model_names()}
        models.update(self.models)
        return models

    def unload(self, name: str) -> None:
        if name in self.models:  # adapters are unloaded through their own route
            super().unload(name)

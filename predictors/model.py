"""The KServe model: registers with kserve's ModelServer and answers V1 predict and V2 infer."""

from __future__ import annotations

import logging
from typing import Any

import kserve
from kserve.protocol.infer_type import InferRequest

from .dataplane import DataPlane
from .infer import INPUTS, OUTPUTS, infer_v2, predict_v1

logger = logging.getLogger("evllm.model")


class EvllmModel(kserve.Model):
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

"""Open Inference Protocol V2 `infer` and KServe V1 `predict`: text in BYTES tensors / instances."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import numpy as np
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from .dataplane import DataPlane, Generation
from .errors import InvalidInput
from .sampling import parse_parameters

TEXT_INPUT = "text_input"

# What /v2/models/{m} advertises: N prompts in, N texts (and why/how long each stopped) out.
INPUTS = [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}]
OUTPUTS = [
    {"name": "text_output", "datatype": "BYTES", "shape": [-1]},
    {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]},
    {"name": "prompt_tokens", "datatype": "INT32", "shape": [-1]},
    {"name": "completion_tokens", "datatype": "INT32", "shape": [-1]},
]


def _decode(item: Any, i: int) -> str:
    if isinstance(item, (bytes, np.bytes_)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{TEXT_INPUT}[{i}] is not valid UTF-8") from None
    if isinstance(item, str):
        return item
    raise InvalidInput(f"{TEXT_INPUT}[{i}] must be a string, got {type(item).__name__}")


def v2_prompts(request: InferRequest) -> list[str]:
    names = [i.name for i in request.inputs]
    if names != [TEXT_INPUT]:
        raise InvalidInput(f"expected exactly one input named '{TEXT_INPUT}', got {names}")
    tensor = request.inputs[0]
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input '{TEXT_INPUT}' must have datatype BYTES, got {tensor.datatype}")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidInput(f"input '{TEXT_INPUT}' must have shape [N] or [N, 1] with N >= 1, got {shape}")
    if getattr(tensor, "_raw_data", None) is not None:
        try:
            items = list(tensor.as_numpy().reshape(-1))
        except Exception as exc:  # malformed binary tensor data is the client's mistake
            raise InvalidInput(f"input '{TEXT_INPUT}': cannot decode binary data: {exc}") from None
    else:
        data = tensor.data
        items = []
        for x in data if isinstance(data, list) else [data]:
            items.extend(x if isinstance(x, list) else [x])
    if len(items) != shape[0]:
        raise InvalidInput(f"input '{TEXT_INPUT}' has shape {shape} but {len(items)} elements")
    return [_decode(x, i) for i, x in enumerate(items)]


async def infer_v2(
    dataplane: DataPlane, request: InferRequest, request_id: str | None, model: str | None = None
) -> InferResponse:
    """``model``: the name the request addressed (the base model or one of its adapters)."""
    prompts = v2_prompts(request)
    params = parse_parameters(request.parameters)
    gens = await dataplane.generate_many(prompts, params, request_id=request_id, model=model)
    n = len(gens)
    outputs = [
        InferOutput("text_output", [n], "BYTES", [g.text for g in gens]),
        InferOutput("finish_reason", [n], "BYTES", [g.finish_reason or "" for g in gens]),
        InferOutput("prompt_tokens", [n], "INT32", [g.prompt_tokens for g in gens]),
        InferOutput("completion_tokens", [n], "INT32", [g.completion_tokens for g in gens]),
    ]
    return InferResponse(
        response_id=request.id or request_id or uuid.uuid4().hex,
        model_name=model or dataplane.model_name,
        infer_outputs=outputs,
        use_binary_outputs=request.use_binary_outputs,
        requested_outputs=request.request_outputs,
    )


def _prediction(g: Generation) -> dict[str, Any]:
    return {
        "text_output": g.text,
        "finish_reason": g.finish_reason,
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
    }


async def predict_v1(
    dataplane: DataPlane, body: Any, request_id: str | None, model: str | None = None
) -> dict[str, Any]:
    """`instances`: strings, or objects {"prompt": ..., <sampling parameters>}; top-level `parameters`
    apply to every instance (an instance's own values win)."""
    if isinstance(body, (bytes, str)):
        # kserve hands over the raw body when the client did not say application/json.
        try:
            body = json.loads(body)
        except ValueError:
            raise InvalidInput("request body is not valid JSON") from None
    if not isinstance(body, dict) or not isinstance(body.get("instances"), list) or not body["instances"]:
        raise InvalidInput('expected {"instances": [...]} with at least one instance')
    dataplane.limits.check_prompts(len(body["instances"]))
    common = body.get("parameters") or {}
    if not isinstance(common, dict):
        raise InvalidInput("parameters must be a JSON object")
    groups: dict[str, tuple[Any, list[tuple[int, str]]]] = {}
    for i, inst in enumerate(body["instances"]):
        if isinstance(inst, str):
            prompt, own = inst, {}
        elif isinstance(inst, dict) and isinstance(inst.get("prompt"), str):
            own = {k: v for k, v in inst.items() if k != "prompt"}
            prompt = inst["prompt"]
        else:
            raise InvalidInput(f'instances[{i}] must be a string or an object with a string "prompt"')
        merged = {**common, **own}
        key = repr(sorted(merged.items(), key=lambda kv: kv[0]))
        if key not in groups:
            groups[key] = (parse_parameters(merged), [])
        groups[key][1].append((i, prompt))
    results = await asyncio.gather(
        *(
            dataplane.generate_many(
                [p for _, p in members], params, request_id=f"{request_id}-{k}", model=model
            )
            for k, (params, members) in enumerate(groups.values())
        )
    )
    predictions: list[dict[str, Any] | None] = [None] * len(body["instances"])
    for (_, members), gens in zip(groups.values(), results, strict=True):
        for (i, _), g in zip(members, gens, strict=True):
            predictions[i] = _prediction(g)
    return {"predictions": predictions}

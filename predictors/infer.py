"""Open Inference Protocol V2 `infer` and KServe V1 `predict`: text in BYTES tensors / instances."""

from __future__ import annotations

import asyncio
import json
import struct
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import orjson
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from kserve.protocol.infer_type import InferOutput, InferRequest, InferResponse

from . import triton
from .dataplane import DataPlane, Generation
from .errors import InvalidInput, describe_validation
from .oip import MODEL_VERSION, add_lean_route
from .sampling import GenerateParameters, parse_parameters

TEXT_INPUT = "text_input"

# What /v2/models/{m} advertises: N prompts in, N texts (and why/how long each stopped) out.
INPUTS = [{"name": TEXT_INPUT, "datatype": "BYTES", "shape": [-1]}]
OUTPUTS = [
    {"name": "text_output", "datatype": "BYTES", "shape": [-1]},
    {"name": "finish_reason", "datatype": "BYTES", "shape": [-1]},
    {"name": "prompt_tokens", "datatype": "INT32", "shape": [-1]},
    {"name": "completion_tokens", "datatype": "INT32", "shape": [-1]},
]
# Triton's additional outputs (see `triton`), present only when a request asks for them: each one's
# datatype and the input switch that asks for it.
ADDITIONAL = {
    "cumulative_logprob": ("FP32", "return_cumulative_logprob"),
    "logprobs": ("BYTES", "return_logprobs"),
    "num_input_tokens": ("UINT32", "return_num_input_tokens"),
    "num_output_tokens": ("UINT32", "return_num_output_tokens"),
}
INFERENCE_HEADER = "inference-header-content-length"
NO_OPTIONS = triton.Options()
STREAM_NEEDS_A_STREAM = "stream = true needs a streaming transport: gRPC ModelStreamInfer or /generate_stream"


def _decode(item: Any, i: int) -> str:
    if isinstance(item, (bytes, np.bytes_)):
        try:
            return bytes(item).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{TEXT_INPUT}[{i}] is not valid UTF-8") from None
    if isinstance(item, str):
        return item
    raise InvalidInput(f"{TEXT_INPUT}[{i}] must be a string, got {type(item).__name__}")


def _elements(tensor: Any) -> list[Any]:
    if getattr(tensor, "_raw_data", None) is not None:
        try:
            return list(tensor.as_numpy().reshape(-1))
        except Exception as exc:  # malformed binary tensor data is the client's mistake
            raise InvalidInput(f"input '{tensor.name}': cannot decode binary data: {exc}") from None
    data = tensor.data
    items: list[Any] = []
    for x in data if isinstance(data, list) else [data]:
        items.extend(x if isinstance(x, list) else [x])
    return items


def _scalar(tensor: Any, datatype: str) -> Any:
    """The one element of a Triton control tensor (`stream` BOOL [1], `sampling_parameters` BYTES [1])."""
    if tensor.datatype != datatype:
        raise InvalidInput(f"input '{tensor.name}' must have datatype {datatype}, got {tensor.datatype}")
    items = _elements(tensor)
    if len(items) != 1:
        raise InvalidInput(f"input '{tensor.name}' must have exactly one element, got {len(items)}")
    item = items[0]
    return item.item() if isinstance(item, np.generic) and not isinstance(item, np.bytes_) else item


@dataclass
class V2Request:
    prompts: list[str]
    params: GenerateParameters
    options: triton.Options
    outputs: frozenset[str] | None = None  # the outputs asked for; None: all

    @property
    def logprobs(self) -> bool:
        return self.options.wants_logprob or self.params.logprobs is not None


def v2_request(request: Any) -> V2Request:
    """Prompts from the BYTES `text_input` tensor [N]; Triton's control tensors (one element each, for
    every prompt) and `sampling_parameters` (instead of the request's `parameters`) beside it."""
    tensors: dict[str, Any] = {}
    for t in request.inputs:
        if t.name in tensors:
            raise InvalidInput(f"input '{t.name}' appears twice")
        tensors[t.name] = t
    extra = sorted(set(tensors) - {TEXT_INPUT} - triton.NAMES)
    if TEXT_INPUT not in tensors or extra:
        raise InvalidInput(
            f"expected an input named '{TEXT_INPUT}' (and optionally Triton's "
            f"{', '.join(sorted(triton.NAMES))}), got {list(tensors)}"
        )
    tensor = tensors[TEXT_INPUT]
    if tensor.datatype != "BYTES":
        raise InvalidInput(f"input '{TEXT_INPUT}' must have datatype BYTES, got {tensor.datatype}")
    shape = list(tensor.shape)
    if not (len(shape) == 1 or (len(shape) == 2 and shape[1] == 1)) or shape[0] < 1:
        raise InvalidInput(f"input '{TEXT_INPUT}' must have shape [N] or [N, 1] with N >= 1, got {shape}")
    items = _elements(tensor)
    if len(items) != shape[0]:
        raise InvalidInput(f"input '{TEXT_INPUT}' has shape {shape} but {len(items)} elements")
    prompts = [_decode(x, i) for i, x in enumerate(items)]
    options = triton.options({k: _scalar(tensors[k], "BOOL") for k in triton.SWITCHES if k in tensors})
    raw = request.parameters
    if triton.SAMPLING_PARAMETERS in tensors:
        raw = triton.sampling_parameters(_scalar(tensors[triton.SAMPLING_PARAMETERS], "BYTES"))
    return V2Request(prompts, parse_parameters(raw), options, _requested_outputs(request, options))


def _requested_outputs(request: Any, options: triton.Options) -> frozenset[str] | None:
    """The output names the request lists (none listed, or an empty list: all), each one this request
    produces: a misspelt name is the client's 400 before any generation, as in Triton."""
    if isinstance(request, JsonRequest):
        names = request.outputs
    else:  # KServe's InferRequest (REST or gRPC)
        names = [o.name for o in request.request_outputs or ()]
    if not names:
        return None
    produced = [str(o["name"]) for o in OUTPUTS] + [
        name for name, (_, switch) in ADDITIONAL.items() if getattr(options, switch)
    ]
    for name in names:
        if name in produced:
            continue
        if name in ADDITIONAL:
            raise InvalidInput(f"output '{name}' needs the input '{ADDITIONAL[name][1]}' set to true")
        raise InvalidInput(
            f"unexpected inference output '{name}': this request's outputs are {', '.join(produced)}"
        )
    return frozenset(names)


def v2_prompts(request: InferRequest) -> list[str]:
    return v2_request(request).prompts


def output_tensors(
    r: V2Request, gens: Sequence[Generation], *, final: bool = True, completion_tokens: Sequence[int] = ()
) -> list[tuple[str, str, list[Any]]]:
    """(name, datatype, data [N]): `text_output` (after the prompt when `exclude_input_in_output` is
    false), and on a final response `finish_reason`, `prompt_tokens`, `completion_tokens`
    (`completion_tokens` overrides the counts when `gens` are a stream's last deltas); Triton's additional
    outputs when asked for. Only the outputs the request lists, when it lists any (the spec's `outputs`)."""
    texts = [(p if r.options.prepend_input else "") + g.text for p, g in zip(r.prompts, gens, strict=True)]
    outputs: list[tuple[str, str, list[Any]]] = [("text_output", "BYTES", texts)]
    if final:
        counts = list(completion_tokens) or [g.completion_tokens for g in gens]
        outputs += [
            ("finish_reason", "BYTES", [g.finish_reason or "" for g in gens]),
            ("prompt_tokens", "INT32", [g.prompt_tokens for g in gens]),
            ("completion_tokens", "INT32", counts),
        ]
    if r.options != NO_OPTIONS:
        top = r.params.logprobs is not None
        extras = [triton.additional(r.options, g, top_logprobs=top) for g in gens]
        outputs += [
            (name, datatype, [e[name] for e in extras])
            for name, (datatype, _) in ADDITIONAL.items()
            if name in extras[0]
        ]
    if r.outputs is not None:
        outputs = [o for o in outputs if o[0] in r.outputs]
    return outputs


def infer_outputs(
    r: V2Request, gens: Sequence[Generation], *, final: bool = True, completion_tokens: Sequence[int] = ()
) -> list[InferOutput]:
    """`output_tensors` as KServe's InferOutputs (binary encodings, gRPC)."""
    n = len(gens)
    tensors = output_tensors(r, gens, final=final, completion_tokens=completion_tokens)
    return [InferOutput(name, [n], datatype, data) for name, datatype, data in tensors]


async def _generate(
    dataplane: DataPlane, request: Any, request_id: str | None, model: str | None
) -> tuple[V2Request, list[Generation]]:
    """A V2 infer request (KServe's InferRequest or a lean JsonRequest) run to its final outputs."""
    r = v2_request(request)
    if r.options.stream:
        raise InvalidInput(STREAM_NEEDS_A_STREAM)
    gens = await dataplane.generate_many(
        r.prompts, r.params, request_id=request_id, model=model, logprobs=r.logprobs
    )
    return r, gens


async def infer_v2(
    dataplane: DataPlane,
    request: InferRequest,
    request_id: str | None,
    model: str | None = None,
    *,
    raw_outputs: bool = False,
) -> InferResponse:
    """``model``: the name the request addressed (the base model or one of its adapters).
    ``raw_outputs``: tensors as bytes whatever the request says (gRPC's raw_output_contents, which
    Triton's clients expect)."""
    r, gens = await _generate(dataplane, request, request_id, model)
    return InferResponse(
        response_id=request.id or request_id or uuid.uuid4().hex,
        model_name=model or dataplane.model_name,
        model_version=MODEL_VERSION,
        infer_outputs=infer_outputs(r, gens),
        use_binary_outputs=raw_outputs or request.use_binary_outputs,
        requested_outputs=request.request_outputs,
    )


def decode(body: bytes, headers: Any, model_name: str) -> InferRequest:
    """A V2 infer request, JSON or with binary tensors (Triton's extension): KServe's own decoding, every
    failure the client's 400."""
    from kserve.protocol.rest.v2_datamodels import InferenceRequest
    from pydantic import ValidationError

    length = headers.get(INFERENCE_HEADER)
    try:
        if length is not None:
            return InferRequest.from_bytes(body, int(length), model_name)
        return InferRequest.from_inference_request(InferenceRequest.model_validate_json(body), model_name)
    except ValidationError as exc:
        raise InvalidInput(describe_validation(exc.errors())) from None
    except InvalidInput:
        raise
    except Exception as exc:
        raise InvalidInput(f"cannot decode the request: {exc}") from None


@dataclass
class JsonTensor:
    """An input tensor of a plain JSON request (KServe's InferInput surface that `v2_request` reads)."""

    name: str
    datatype: str
    shape: list[int]
    data: list[Any]
    _raw_data: None = None


@dataclass
class JsonRequest:
    inputs: list[JsonTensor]
    parameters: dict[str, Any] | None
    id: str | None
    outputs: list[str] | None  # requested output names
    binary: frozenset[str] = frozenset()  # outputs to send as raw bytes after the JSON (Triton's extension)
    all_binary: bool = False  # every output as raw bytes (`binary_data_output` with no outputs listed)


# Binary tensor data the lean path reads (the datatypes of text_input and Triton's control tensors), and
# writes (every output's datatype): struct formats per element; BYTES are 4-byte length-prefixed.
_REQUEST_KEYS = frozenset({"id", "inputs", "outputs", "parameters"})
_TENSOR_KEYS = frozenset({"name", "datatype", "shape", "data", "parameters"})
_READ = {"BYTES", "BOOL"}
_WRITE = {"INT32": "i", "UINT32": "I", "FP32": "f"}


def _bytes_elements(blob: bytes) -> list[bytes] | None:
    items, i = [], 0
    while i < len(blob):
        if i + 4 > len(blob):
            return None
        n = int.from_bytes(blob[i : i + 4], "little")
        if i + 4 + n > len(blob):
            return None
        items.append(blob[i + 4 : i + 4 + n])
        i += 4 + n
    return items


def _lean_request(body: bytes, json_length: int | None) -> JsonRequest | None:
    """The request, when it has a common shape: JSON tensors, or binary BYTES/BOOL tensors after a JSON
    header (`json_length`), and outputs as JSON or as binary for the whole request or per output. Parsed
    without KServe's pydantic models and InferRequest conversion. None for anything else (other binary
    datatypes, anything malformed or unusual): KServe's decoding handles it, with its errors."""
    header, blobs = (body, b"") if json_length is None else (body[:json_length], body[json_length:])
    if json_length is not None and not 0 < json_length <= len(body):
        return None
    try:
        raw = orjson.loads(header)
    except orjson.JSONDecodeError:
        return None
    if not isinstance(raw, dict) or not raw.keys() <= _REQUEST_KEYS:
        return None
    rid, params, inputs, outputs = raw.get("id"), raw.get("parameters"), raw.get("inputs"), raw.get("outputs")
    if not (rid is None or isinstance(rid, str)) or not (params is None or isinstance(params, dict)):
        return None
    if not isinstance(inputs, list) or not inputs:
        return None
    tensors, offset = [], 0
    for t in inputs:
        if not (isinstance(t, dict) and t.keys() <= _TENSOR_KEYS):
            return None
        name, datatype, shape, data = t.get("name"), t.get("datatype"), t.get("shape"), t.get("data")
        if not (isinstance(name, str) and isinstance(datatype, str)):
            return None
        if not (isinstance(shape, list) and all(type(d) is int for d in shape)):
            return None
        tensor_params = t.get("parameters")
        if tensor_params:
            if not isinstance(tensor_params, dict) or tensor_params.keys() != {"binary_data_size"}:
                return None
            size = tensor_params["binary_data_size"]
            if type(size) is not int or data is not None:
                return None
            if datatype not in _READ or size < 0 or offset + size > len(blobs):
                return None
            blob = blobs[offset : offset + size]
            offset += size
            data = _bytes_elements(blob) if datatype == "BYTES" else [b != 0 for b in blob]
            if data is None:
                return None
        elif not isinstance(data, list):
            return None
        tensors.append(JsonTensor(name, datatype, shape, data))
    if offset != len(blobs):
        return None
    everything = bool(params and params.get("binary_data_output"))
    names, binary = None, set()
    if outputs is not None:
        if not isinstance(outputs, list):
            return None
        names = []
        for o in outputs:
            if not (
                isinstance(o, dict) and isinstance(o.get("name"), str) and o.keys() <= {"name", "parameters"}
            ):
                return None
            output_params = o.get("parameters") or {}
            if not isinstance(output_params, dict) or output_params.keys() - {"binary_data"}:
                return None
            names.append(o["name"])
            if output_params.get("binary_data", everything) is True:
                binary.add(o["name"])
    return JsonRequest(tensors, params, rid, names, frozenset(binary), everything and not outputs)


def _raw(datatype: str, data: list[Any]) -> bytes:
    if datatype == "BYTES":
        items = [x.encode() if isinstance(x, str) else bytes(x) for x in data]
        return b"".join(len(x).to_bytes(4, "little") + x for x in items)
    return struct.pack(f"<{len(data)}{_WRITE[datatype]}", *data)


async def _infer_lean(
    dataplane: DataPlane, request: JsonRequest, request_id: str | None, model: str
) -> tuple[bytes, int | None]:
    """The response body, and the length of its JSON header when binary outputs follow it."""
    r, gens = await _generate(dataplane, request, request_id, model)
    n = len(gens)
    outputs, raws = [], []
    for name, datatype, data in output_tensors(r, gens):
        if request.all_binary or name in request.binary:
            raw = _raw(datatype, data)
            raws.append(raw)
            outputs.append({"name": name, "shape": [n], "datatype": datatype,
                            "parameters": {"binary_data_size": len(raw)}})  # fmt: skip
        else:
            outputs.append({"name": name, "shape": [n], "datatype": datatype, "data": data})
    header = orjson.dumps(
        {
            "id": request.id or request_id or uuid.uuid4().hex,
            "model_name": model,
            "model_version": MODEL_VERSION,
            "outputs": outputs,
        }
    )
    if not raws:
        return header, None
    return b"".join([header, *raws]), len(header)


def _http(answer: bytes | dict[str, Any], json_length: int | None) -> Response:
    """A V2 infer answer: JSON, or (`json_length` set) a JSON header and raw outputs (Triton's binary
    extension)."""
    if json_length is not None:
        headers = {INFERENCE_HEADER: str(json_length)}
        return Response(answer, media_type="application/octet-stream", headers=headers)
    if isinstance(answer, bytes):
        return Response(answer, media_type="application/json")
    return JSONResponse(answer)


def router(dataplane: DataPlane) -> APIRouter:
    """V2 infer, shadowing KServe's route (same path, body and errors; registered first): requests of the
    common shapes (JSON tensors, binary BYTES/BOOL tensors, JSON or binary outputs) skip KServe's pydantic
    models and InferRequest/InferResponse conversions (the lean path, profiled: bench/); anything else
    goes through KServe's decoding and encoding."""
    api = APIRouter(include_in_schema=False)  # KServe's route documents the same path

    async def infer(model_name: str, request: Request) -> Response:
        dataplane.check_model(model_name)  # the base model or one of its adapters
        body = await request.body()
        request_id = request.headers.get("x-request-id")
        length = request.headers.get(INFERENCE_HEADER)
        header_length = int(length) if length is not None and length.isdigit() else None
        lean = _lean_request(body, header_length) if length is None or header_length is not None else None
        if lean is not None:
            return _http(*await _infer_lean(dataplane, lean, request_id, model_name))
        infer_request = decode(body, request.headers, model_name)
        response = await infer_v2(dataplane, infer_request, request_id, model_name)
        return _http(*response.to_rest())

    add_lean_route(api, "/v2/models/{model_name}/infer", infer)
    return api


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

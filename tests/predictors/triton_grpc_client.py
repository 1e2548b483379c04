"""tritonclient.grpc driven from a JSON script, in a process of its own: its generated protobufs and
KServe's declare the same `inference.*` symbols, which one Python process cannot load together (and the
test process has KServe's). Usage: `python -m tests.predictors.triton_grpc_client HOST:PORT < ops.json`;
prints one JSON result per operation.

Operations: {"op": "live" | "ready" | "server_metadata"}, {"op": "model_ready" | "model_metadata",
"model", "version"}, {"op": "infer", "request": R}, {"op": "stream", "requests": [R, ...]} where R is
{"model", "prompts", "tensors": {name: value}, "parameters", "request_id", "version", "headers",
"outputs": [name, ...]};
`tensors` are Triton's control tensors (BOOL, or `sampling_parameters` as a JSON string).
"""

from __future__ import annotations

import json
import queue
import sys
from typing import Any

import numpy as np
import tritonclient.grpc as triton
from google.protobuf.json_format import MessageToDict
from tritonclient.utils import InferenceServerException


def _inputs(prompts: list[str], tensors: dict[str, Any]) -> list[Any]:
    inputs = [triton.InferInput("text_input", [len(prompts)], "BYTES")]
    inputs[-1].set_data_from_numpy(np.array([p.encode() for p in prompts], dtype=np.object_))
    for name, value in tensors.items():
        if name == "sampling_parameters":
            inputs.append(triton.InferInput(name, [1], "BYTES"))
            inputs[-1].set_data_from_numpy(np.array([json.dumps(value).encode()], dtype=np.object_))
        else:
            inputs.append(triton.InferInput(name, [1], "BOOL"))
            inputs[-1].set_data_from_numpy(np.array([value], dtype=bool))
    return inputs


def _kwargs(r: dict[str, Any]) -> dict[str, Any]:
    return {
        "model_name": r.get("model", "demo"),
        "inputs": _inputs(r["prompts"], r.get("tensors", {})),
        "model_version": r.get("version", ""),
        "request_id": r.get("request_id", ""),
        "parameters": r.get("parameters"),
        "outputs": [triton.InferRequestedOutput(name) for name in r["outputs"]] if "outputs" in r else None,
    }


def _result(result: Any) -> dict[str, Any]:
    response = result.get_response()
    outputs = {}
    for output in response.outputs:
        values = result.as_numpy(output.name).tolist()
        outputs[output.name] = [v.decode() if isinstance(v, bytes) else v for v in values]
    return {"id": response.id, "model_version": response.model_version, "outputs": outputs}


def _error(exc: InferenceServerException) -> dict[str, Any]:
    return {"error": {"status": str(exc.status()), "message": exc.message()}}


def run(client: Any, op: dict[str, Any]) -> Any:
    kind = op["op"]
    try:
        if kind == "live":
            return client.is_server_live()
        if kind == "ready":
            return client.is_server_ready()
        if kind == "server_metadata":
            return MessageToDict(client.get_server_metadata())
        if kind == "model_ready":
            return client.is_model_ready(op["model"], op.get("version", ""))
        if kind == "model_metadata":
            return client.get_model_metadata(op["model"], op.get("version", ""), as_json=True)
        if kind == "infer":
            r = op["request"]
            return _result(client.infer(headers=r.get("headers"), **_kwargs(r)))
        if kind == "stream":
            answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
            client.start_stream(callback=lambda result, error: answers.put((result, error)))
            for r in op["requests"]:
                client.async_stream_infer(**_kwargs(r))
            client.stop_stream()  # waits for every response
            return [_error(e) if e is not None else _result(res) for res, e in list(answers.queue)]
    except InferenceServerException as exc:
        return _error(exc)
    raise ValueError(f"unknown op {kind}")


def main() -> None:
    ops = json.load(sys.stdin)
    with triton.InferenceServerClient(sys.argv[1]) as client:
        print(json.dumps([run(client, op) for op in ops]))


if __name__ == "__main__":
    main()

"""A lean closed-loop load client: one process, one event loop, `concurrency` workers.

The client shares the 2 cores with the server, so it does as little as possible per request: bodies are
encoded once, responses are parsed only for the completion-token count (checked: every request must
produce exactly the tokens asked for, or the run is invalid).
"""

from __future__ import annotations

import asyncio
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import aiohttp

PROMPTS = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog",
    "Once upon a time there was a cluster",
    "Serverless inference scales a model to zero",
    "An event driven system routes CloudEvents",
    "Kubernetes schedules pods onto nodes",
    "A batch job splits its input into chunks",
    "Priority scheduling lets online traffic run ahead",
]
OUTPUT_TOKENS = 32


@dataclass
class Protocol:
    name: str
    path: str  # appended to the server URL (gRPC: the method's path)
    bodies: list[bytes]
    tokens: Callable[[Any], int]  # decoded response -> completion tokens
    grpc: bool = False  # bodies are serialized ModelInferRequests, sent to `grpc_target`
    headers: dict[str, str] | None = None  # HTTP headers (default: JSON)
    raw: bool = False  # `tokens` gets the response bytes, not parsed JSON


def openai_completions(prefix: str, model: str) -> Protocol:
    params = {"max_tokens": OUTPUT_TOKENS, "temperature": 0.0, "ignore_eos": True}
    bodies = [json.dumps({"model": model, "prompt": p, **params}).encode() for p in PROMPTS]
    return Protocol("openai", prefix + "/v1/completions", bodies, lambda r: r["usage"]["completion_tokens"])


def lora_completions(prefix: str, model: str, adapter: str) -> Protocol:
    """OpenAI completions spread over the base model and one LoRA adapter: every prompt once for each,
    alternating, so a closed loop keeps both in flight (the engine batches them together)."""
    params = {"max_tokens": OUTPUT_TOKENS, "temperature": 0.0, "ignore_eos": True}
    bodies = [
        json.dumps({"model": m, "prompt": p, **params}).encode() for p in PROMPTS for m in (model, adapter)
    ]
    return Protocol(
        "openai-lora", prefix + "/v1/completions", bodies, lambda r: r["usage"]["completion_tokens"]
    )


def v2_infer(model: str) -> Protocol:
    params = {"max_tokens": OUTPUT_TOKENS, "temperature": 0.0, "ignore_eos": True}
    tensor = {"name": "text_input", "datatype": "BYTES", "shape": [1]}
    bodies = [
        json.dumps({"inputs": [{**tensor, "data": [p]}], "parameters": params}).encode() for p in PROMPTS
    ]

    def tokens(r: Any) -> int:
        out = next(o for o in r["outputs"] if o["name"] == "completion_tokens")
        return int(out["data"][0])

    return Protocol("v2-infer", f"/v2/models/{model}/infer", bodies, tokens)


def v2_infer_binary(model: str) -> Protocol:
    """V2 infer with the binary tensor extension both ways: the prompt as raw BYTES after the JSON header
    (4-byte length + UTF-8) and `binary_data_output`, so every output comes back raw too."""
    params = {"max_tokens": OUTPUT_TOKENS, "temperature": 0.0, "ignore_eos": True, "binary_data_output": True}
    bodies, lengths = [], []
    for p in PROMPTS:
        data = len(p.encode()).to_bytes(4, "little") + p.encode()
        tensor = {"name": "text_input", "datatype": "BYTES", "shape": [1],
                  "parameters": {"binary_data_size": len(data)}}  # fmt: skip
        header = json.dumps({"inputs": [tensor], "parameters": params}).encode()
        bodies.append(header + data)
        lengths.append(len(header))
    # One header length for every body would be wrong: each body carries its own (sent per request).
    if len(set(lengths)) != 1:
        width = max(lengths)
        bodies = [b[:n] + b" " * (width - n) + b[n:] for b, n in zip(bodies, lengths, strict=True)]
    headers = {
        "content-type": "application/octet-stream",
        "inference-header-content-length": str(max(lengths)),
    }

    def tokens(raw: bytes) -> int:
        header, offset = json.JSONDecoder().raw_decode(raw.decode("latin-1"))
        for out in header["outputs"]:
            size = int(out["parameters"]["binary_data_size"])
            if out["name"] == "completion_tokens":
                return int.from_bytes(raw[offset : offset + 4], "little", signed=True)
            offset += size
        raise KeyError("completion_tokens")

    return Protocol("v2-infer-binary", f"/v2/models/{model}/infer", bodies, tokens, headers=headers, raw=True)


def v2_generate(model: str) -> Protocol:
    params = {"max_tokens": OUTPUT_TOKENS, "temperature": 0.0, "ignore_eos": True}
    bodies = [json.dumps({"text_input": p, "parameters": params}).encode() for p in PROMPTS]
    return Protocol("v2-generate", f"/v2/models/{model}/generate", bodies, lambda r: r["completion_tokens"])


def v2_grpc(model: str) -> Protocol:
    """V2 infer over gRPC (GRPCInferenceService/ModelInfer), Triton's protobufs; responses come back as
    raw_output_contents (what evllm and Triton send)."""
    from tritonclient.grpc import service_pb2 as pb

    bodies = []
    for p in PROMPTS:
        request = pb.ModelInferRequest(model_name=model)
        tensor = request.inputs.add(name="text_input", datatype="BYTES", shape=[1])
        tensor.contents.bytes_contents.append(p.encode())
        for key, value in (("max_tokens", OUTPUT_TOKENS), ("temperature", 0.0), ("ignore_eos", True)):
            param = request.parameters[key]
            if isinstance(value, bool):
                param.bool_param = value
            elif isinstance(value, int):
                param.int64_param = value
            else:
                param.double_param = value
        bodies.append(request.SerializeToString())

    def tokens(raw: bytes) -> int:
        response = pb.ModelInferResponse.FromString(raw)
        i = next(k for k, o in enumerate(response.outputs) if o.name == "completion_tokens")
        return int.from_bytes(response.raw_output_contents[i][:4], "little", signed=True)

    return Protocol("v2-grpc", "/inference.GRPCInferenceService/ModelInfer", bodies, tokens, grpc=True)


@dataclass
class LoadResult:
    protocol: str
    concurrency: int
    duration: float
    requests: int
    errors: int
    req_s: float
    tok_s: float
    p50: float
    p95: float
    p99: float

    @classmethod
    def of(
        cls,
        protocol: str,
        concurrency: int,
        duration: float,
        latencies: list[float],
        tokens: int,
        errors: int,
    ) -> LoadResult:
        """A window's result from the latencies of the requests that finished inside it."""
        n = len(latencies)
        return cls(
            protocol=protocol,
            concurrency=concurrency,
            duration=duration,
            requests=n,
            errors=errors,
            req_s=n / duration,
            tok_s=tokens / duration,
            p50=percentile(latencies, 50),
            p95=percentile(latencies, 95),
            p99=percentile(latencies, 99),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100); nan for no values."""
    if not values:
        return float("nan")
    s = sorted(values)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return s[k]


async def closed_loop(
    base_url: str, proto: Protocol, concurrency: int, warmup: float, duration: float
) -> LoadResult:
    """Each worker sends its next request as soon as the previous answer arrives. Requests that finish
    inside [warmup, warmup + duration] count; latency is per request, start to last byte. gRPC: one
    HTTP/2 channel to `base_url` (host:port), bytes in and out."""
    if proto.grpc:
        import grpc

        channel = grpc.aio.insecure_channel(base_url)
        call = channel.unary_unary(proto.path)
    headers = proto.headers or {"content-type": "application/json"}
    latencies: list[float] = []
    tokens = 0
    errors = 0
    t_start = time.perf_counter()
    t_measure, t_end = t_start + warmup, t_start + warmup + duration
    url = base_url + proto.path
    connector = aiohttp.TCPConnector(limit=concurrency, force_close=False)
    timeout = aiohttp.ClientTimeout(total=600)

    async def worker(k: int) -> None:
        nonlocal tokens, errors
        i = k
        while True:
            t0 = time.perf_counter()
            if t0 >= t_end:
                return
            body = proto.bodies[i % len(proto.bodies)]
            i += 1
            if proto.grpc:
                try:
                    raw, status = await call(body), 200
                except grpc.aio.AioRpcError as exc:
                    raw, status = str(exc.details()).encode(), exc.code().value[0]
            else:
                async with session.post(url, data=body, headers=headers) as resp:
                    raw = await resp.read()
                    status = resp.status
            t1 = time.perf_counter()
            if not (t_measure <= t1 <= t_end):
                continue
            if status != 200:
                errors += 1
                if errors == 1:
                    print(f"  ! {proto.name}: HTTP {status}: {raw[:300]!r}", flush=True)
                continue
            n = proto.tokens(raw if proto.grpc or proto.raw else json.loads(raw))
            if n != OUTPUT_TOKENS:
                raise RuntimeError(f"{proto.name}: {n} completion tokens, expected {OUTPUT_TOKENS}")
            latencies.append(t1 - t0)
            tokens += n

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(worker(k) for k in range(concurrency)))
    if proto.grpc:
        await channel.close()
    return LoadResult.of(proto.name, concurrency, duration, latencies, tokens, errors)


def run_load(base_url: str, proto: Protocol, concurrency: int, warmup: float, duration: float) -> LoadResult:
    try:
        import uvloop

        runner = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    t0 = time.perf_counter()
    res = runner(closed_loop(base_url, proto, concurrency, warmup, duration))
    print(
        f"  {proto.name:12s} c={concurrency:<3d} {res.req_s:7.1f} req/s {res.tok_s:8.0f} tok/s "
        f"p50={res.p50 * 1e3:7.1f}ms p95={res.p95 * 1e3:7.1f}ms p99={res.p99 * 1e3:7.1f}ms "
        f"n={res.requests} err={res.errors} ({time.perf_counter() - t0:.0f}s)",
        flush=True,
    )
    return res

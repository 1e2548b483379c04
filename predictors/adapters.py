"""LoRA adapters: each one a model name on every protocol, served by the one engine.

vLLM's `OpenAIServingModels` stays the single registry of names (what ``/openai/v1/models`` lists and what
every OpenAI request's ``model`` resolves against); the other protocols ask the data plane, which asks it.
This module adds what `vllm serve` leaves to the operator: adapters from an fsspec URI (downloaded to
``--cache_dir``), the generated demo adapter (source ``demo``), and checks that refuse a bad adapter with
a 400 *before* the engine sees it (the engine only copies an adapter's tensors into its slots when a
request first uses it, so a wrong-shaped one would otherwise fail there, mid-generation).

Runtime load/unload use `vllm serve`'s routes and bodies (``POST /openai/v1/load_lora_adapter``
``{"lora_name", "lora_path"}``, ``POST /openai/v1/unload_lora_adapter`` ``{"lora_name"}``), always on
with ``--enable-lora`` and behind evllm's authentication like every route. Unloading removes the name
(new requests: 404); requests already in the engine keep the adapter's weights and finish.
"""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import tempfile
from functools import cache
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response

from .config import DEMO
from .errors import EvllmError, InvalidInput, ModelNotFound

logger = logging.getLogger("evllm.adapters")

CONFIG = "adapter_config.json"
WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
LOAD_PATH = "/openai/v1/load_lora_adapter"
UNLOAD_PATH = "/openai/v1/unload_lora_adapter"


class BadAdapter(InvalidInput):
    """An adapter that cannot be served: missing files, a rank above --max-lora-rank, another base model."""


def _is_remote(source: str) -> bool:
    return "://" in source and not source.startswith("file://")


def fetch(source: str, name: str, cache_dir: str) -> Path:
    """A local directory holding the adapter ``source`` names: ``demo`` (the generated demo adapter), a
    local path (or ``file://``), or an fsspec URI (``s3://``, ``gs://``, ...) downloaded to a new
    directory under ``<cache_dir>/adapters`` (new on every load, so a reload never changes the files an
    adapter already in the engine was read from)."""
    if source == DEMO:
        from .demo_model import demo_dir, ensure_demo_adapter

        return ensure_demo_adapter(demo_dir(cache_dir))
    if not _is_remote(source):
        return Path(source.removeprefix("file://")).expanduser()
    import fsspec

    root = Path(cache_dir) / "adapters"
    root.mkdir(parents=True, exist_ok=True)
    target = Path(tempfile.mkdtemp(prefix=f"{name}-", dir=root))
    try:
        fs, path = fsspec.core.url_to_fs(source)
        if not fs.isdir(path):
            raise BadAdapter(f"adapter {name!r}: no directory at {source}")
        fs.get(path.rstrip("/") + "/", str(target), recursive=True)
    except BadAdapter:
        shutil.rmtree(target, ignore_errors=True)
        raise
    except Exception as exc:  # the URI, its credentials or its store: the caller's to fix
        shutil.rmtree(target, ignore_errors=True)
        raise BadAdapter(f"adapter {name!r}: cannot download {source}: {type(exc).__name__}: {exc}") from None
    return target


@cache
def _base_shapes(model_dir: str) -> dict[str, tuple[int, ...]]:
    """Shapes of a local base model's float weight matrices, from its safetensors headers (no tensor is
    read). Empty when the model is not a local safetensors checkpoint: vLLM's own checks then apply."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(model_dir).glob("*.safetensors")) if Path(model_dir).is_dir() else ():
        with safe_open(str(file), framework="numpy") as f:
            names = f.keys()  # a safe_open handle is not iterable
            for key in names:
                s = f.get_slice(key)
                if len(s.get_shape()) == 2 and s.get_dtype().startswith(("F", "BF")):
                    shapes[key] = tuple(s.get_shape())
    return shapes


def _adapter_shapes(weights: Path) -> dict[str, tuple[int, ...]]:
    from safetensors import safe_open

    with safe_open(str(weights), framework="numpy") as f:
        names = f.keys()
        return {k: tuple(f.get_slice(k).get_shape()) for k in names}


def _check_fits(name: str, weights: Path, model_dir: str) -> None:
    """Every lora_A/lora_B pair must fit a base weight of the same module: A is [r, in], B [out, r]."""
    base = _base_shapes(model_dir)
    if not base or weights.suffix != ".safetensors":
        return
    try:
        tensors = _adapter_shapes(weights)
    except Exception as exc:
        raise BadAdapter(f"adapter {name!r}: unreadable {weights.name}: {exc}") from None
    matched = 0
    for key, shape in tensors.items():
        for part, dim in (("lora_A", 1), ("lora_B", 0)):
            if not key.endswith(f".{part}.weight"):
                continue
            module = key.removeprefix("base_model.model.").removesuffix(f".{part}.weight")
            target = base.get(module + ".weight")
            if target is None:
                continue  # a name vLLM maps (multimodal prefixes, packed modules): its checks apply
            matched += 1
            if len(shape) != 2 or shape[dim] != target[dim]:
                raise BadAdapter(
                    f"adapter {name!r} does not fit the base model: {key} has shape {list(shape)}, "
                    f"{module} is {list(target)} (an adapter trained on another model?)"
                )
    if not matched and any(k.endswith(".lora_A.weight") for k in tensors):
        raise BadAdapter(
            f"adapter {name!r} does not fit the base model: none of its modules is in the base model "
            "(an adapter trained on another model?)"
        )


def check(name: str, path: Path, max_rank: int, model_dir: str) -> None:
    """Refuse an adapter the engine could not serve, with the reason (BadAdapter, a 400)."""
    if not path.is_dir():
        raise BadAdapter(f"adapter {name!r}: no directory at {path}")
    config_file = path / CONFIG
    if not config_file.is_file():
        raise BadAdapter(f"adapter {name!r}: {CONFIG} is missing in {path} (a PEFT adapter directory?)")
    weights = next((path / w for w in WEIGHTS if (path / w).is_file()), None)
    if weights is None:
        raise BadAdapter(f"adapter {name!r}: no {' or '.join(WEIGHTS)} in {path}")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadAdapter(f"adapter {name!r}: {CONFIG} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise BadAdapter(f"adapter {name!r}: {CONFIG} must be a JSON object")
    pattern = config.get("rank_pattern") or {}
    ranks = [config.get("r"), *(pattern.values() if isinstance(pattern, dict) else [None])]
    if not all(isinstance(r, int) and not isinstance(r, bool) and r > 0 for r in ranks):
        raise BadAdapter(f"adapter {name!r}: {CONFIG} needs a positive integer rank `r`")
    if max(ranks) > max_rank:
        raise BadAdapter(
            f"adapter {name!r} has rank {max(ranks)}, above --max-lora-rank {max_rank}: restart with a "
            "larger --max-lora-rank to serve it"
        )
    _check_fits(name, weights, model_dir)


def resolve_static(lora_modules: list[Any], cache_dir: str, max_rank: int, model_dir: str) -> None:
    """`--lora-modules name=source` at startup: fetch and check each, then hand vLLM the local path."""
    for module in lora_modules:
        path = fetch(module.path, module.name, cache_dir)
        check(module.name, path, max_rank, model_dir)
        module.path = str(path)


class Adapters:
    """Runtime load/unload by name, on vLLM's registry (`OpenAIServingModels`) of the running engine."""

    def __init__(self, dataplane: Any, cache_dir: str):
        self.dataplane = dataplane
        self.cache_dir = cache_dir

    @property
    def _args(self) -> Any:
        return self.dataplane.engine.args

    def _registry(self) -> Any:
        if not getattr(self._args, "enable_lora", False):
            raise InvalidInput("LoRA adapters are off: start evllm serve with --enable-lora")
        self.dataplane.engine.check_ready()
        return self.dataplane.openai.serving_models()

    async def load(self, body: Any) -> str:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import LoadLoRAAdapterRequest

        registry = self._registry()
        name, source, inplace = _fields(body, ("lora_name", "lora_path"), "load_inplace")
        if name == self.dataplane.model_name:
            raise InvalidInput(f"lora_name {name!r} is the base model's name")
        if name in registry.lora_requests and not inplace:
            raise InvalidInput(
                f"adapter {name!r} is already loaded: unload it first, or set load_inplace to replace it"
            )
        path = await asyncio.to_thread(fetch, source, name, self.cache_dir)
        max_rank = int(self._args.max_lora_rank)
        await asyncio.to_thread(check, name, path, max_rank, str(self._args.model))
        result = await registry.load_lora_adapter(
            LoadLoRAAdapterRequest(lora_name=name, lora_path=str(path), load_inplace=inplace)
        )
        if isinstance(result, ErrorResponse):
            # The checks above passed, so what the engine refuses is still the adapter's fault.
            raise BadAdapter(f"adapter {name!r} cannot be loaded: {result.error.message}")
        self.dataplane.adapter_loaded(name)
        logger.info("loaded adapter %s from %s", name, source)
        return str(result)

    async def unload(self, body: Any) -> str:
        from vllm.entrypoints.serve.engine.protocol import ErrorResponse
        from vllm.entrypoints.serve.lora.protocol import UnloadLoRAAdapterRequest

        registry = self._registry()
        (name,) = _fields(body, ("lora_name",))
        if name == self.dataplane.model_name:
            raise InvalidInput(f"{name!r} is the base model, not an adapter: it cannot be unloaded")
        if name not in registry.lora_requests:
            raise self.dataplane.not_found(name)
        result = await registry.unload_lora_adapter(UnloadLoRAAdapterRequest(lora_name=name))
        if isinstance(result, ErrorResponse):
            raise self.dataplane.not_found(name)
        logger.info("unloaded adapter %s", name)
        return str(result)


def _fields(body: Any, required: tuple[str, ...], flag: str | None = None) -> list[Any]:
    if not isinstance(body, dict):
        raise InvalidInput("request body must be a JSON object")
    allowed = {*required, "lora_int_id", "is_3d_lora_weight", *([flag] if flag else [])}
    unknown = sorted(set(body) - allowed)
    if unknown:
        raise InvalidInput(f"unknown field(s): {', '.join(unknown)}")
    values: list[Any] = []
    for key in required:
        value = body.get(key)
        if not isinstance(value, str) or not value.strip():
            raise InvalidInput(f"{key} is required and must be a non-empty string")
        values.append(value.strip())
    if flag is not None:
        value = body.get(flag, False)
        if not isinstance(value, bool):
            raise InvalidInput(f"{flag} must be a boolean")
        values.append(value)
    return values


def _openai_error(exc: EvllmError) -> JSONResponse:
    """These routes live in the OpenAI namespace: errors in vLLM's OpenAI shape, as its own would be."""
    kind = "NotFoundError" if isinstance(exc, ModelNotFound) else "BadRequestError"
    if exc.status >= 500:
        kind = "ServiceUnavailableError"
    body = {"error": {"message": exc.message, "type": kind, "param": None, "code": int(exc.status)}}
    return JSONResponse(body, status_code=int(exc.status), headers=exc.headers)


def router(adapters: Adapters) -> APIRouter:
    api = APIRouter(tags=["lora"])

    async def _call(request: Request, action: Any) -> Response:
        try:
            try:
                body = json.loads(await request.body())
            except (ValueError, UnicodeDecodeError):
                raise InvalidInput("request body is not valid JSON") from None
            return PlainTextResponse(await action(body))
        except EvllmError as exc:
            return _openai_error(exc)

    @api.post(LOAD_PATH, response_model=None)
    async def load_lora_adapter(request: Request) -> Response:
        return await _call(request, adapters.load)

    @api.post(UNLOAD_PATH, response_model=None)
    async def unload_lora_adapter(request: Request) -> Response:
        return await _call(request, adapters.unload)

    return api

"""evllm's data plane behind uvicorn with a raw ASGI app (no FastAPI, no middleware)."""

import asyncio
import json
import sys

import uvicorn
import uvloop

from predictors.dataplane import DataPlane
from predictors.engine import Engine
from predictors.model import EvllmModel
from predictors.sampling import parse_parameters
from predictors.server import parse_args

MODEL = "demo"
dp = None


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        while True:
            m = await receive()
            if m["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = b""
    while True:
        m = await receive()
        body += m.get("body", b"")
        if not m.get("more_body"):
            break
    req = json.loads(body)
    params = parse_parameters(req.get("parameters") or {})
    g = await dp.generate(req["text_input"], params, model=MODEL)
    out = json.dumps(
        {
            "model_name": MODEL,
            "model_version": None,
            "text_output": g.text,
            "finish_reason": g.finish_reason,
            "prompt_tokens": g.prompt_tokens,
            "completion_tokens": g.completion_tokens,
        }
    ).encode()
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())],
        }
    )
    await send({"type": "http.response.body", "body": out})


async def main():
    global dp
    model_dir, port = sys.argv[1], int(sys.argv[2])
    settings = parse_args(
        ["--model_name", MODEL, "--model_dir", model_dir, "--max-model-len", "1024", "--dtype", "float32"]
    )
    dp = DataPlane(Engine(settings.engine, settings.engine_flags), MODEL)
    await EvllmModel(MODEL, dp).start_engine()
    cfg = uvicorn.Config(
        app, host="127.0.0.1", port=port, log_config=None, access_log=False, loop="none", http="httptools"
    )
    server = uvicorn.Server(cfg)

    async def ready():
        while not server.started:
            await asyncio.sleep(0.05)
        print("READY", flush=True)

    asyncio.get_running_loop().create_task(ready())
    await server.serve()


if __name__ == "__main__":
    uvloop.run(main())

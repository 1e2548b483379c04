"""evllm's data plane behind uvicorn with a raw ASGI app (no FastAPI, no middleware)."""

import asyncio
import sys

import uvicorn
import uvloop
from bare import generate, start

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
    out = await generate(dp, body)
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
    dp = await start(model_dir)
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

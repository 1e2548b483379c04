"""Experiment: evllm's data plane behind a minimal HTTP/1.1 server (httptools on uvloop, no ASGI, no
FastAPI, no middleware). Serves POST /v2/models/<m>/generate only. argv: model_dir port. Run with the repository on PYTHONPATH (multi.py does)."""

import asyncio
import json
import sys

import httptools
import uvloop

from bench.run import Config
from bench.servers import MODEL_NAME as MODEL
from predictors.dataplane import DataPlane
from predictors.engine import Engine
from predictors.model import EvllmModel
from predictors.sampling import parse_parameters
from predictors.server import parse_args


class Proto(asyncio.Protocol):
    def __init__(self, dp):
        self.dp = dp
        self.parser = httptools.HttpRequestParser(self)
        self.body = []

    def connection_made(self, t):
        self.t = t

    def data_received(self, data):
        self.parser.feed_data(data)

    def on_message_begin(self):
        self.body = []

    def on_body(self, b):
        self.body.append(b)

    def on_message_complete(self):
        asyncio.get_running_loop().create_task(self.handle(b"".join(self.body)))

    async def handle(self, body):
        out = await generate(self.dp, body)
        self.t.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n%s"
            % (len(out), out)
        )


async def generate(dp, body):
    """A V2 generate request body -> the response body, through the data plane."""
    req = json.loads(body)
    params = parse_parameters(req.get("parameters") or {})
    g = await dp.generate(req["text_input"], params, model=MODEL)
    answer = {
        "model_name": MODEL,
        "model_version": None,
        "text_output": g.text,
        "finish_reason": g.finish_reason,
        "prompt_tokens": g.prompt_tokens,
        "completion_tokens": g.completion_tokens,
    }
    return json.dumps(answer).encode()


async def start(model_dir):
    """The data plane, its engine built and started as `evllm serve` does (the benchmark's flags)."""
    settings = parse_args(["--model_name", MODEL, "--model_dir", model_dir, *Config().engine_args])
    dp = DataPlane(Engine(settings.engine, settings.engine_flags), MODEL)
    await EvllmModel(MODEL, dp).start_engine()
    return dp


async def main():
    model_dir, port = sys.argv[1], int(sys.argv[2])
    dp = await start(model_dir)
    loop = asyncio.get_running_loop()
    srv = await loop.create_server(lambda: Proto(dp), "127.0.0.1", port)
    print("READY", flush=True)
    await srv.serve_forever()


if __name__ == "__main__":
    uvloop.run(main())

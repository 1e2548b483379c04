"""Composition root: flag parsing (KServe's, evllm's and vLLM's engine flags), the model to serve, health
semantics and what the server answers while the engine starts, drains or is dead."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from predictors.config import ServerConfig
from predictors.errors import EngineStartFailed
from predictors.server import build_parser, parse_args, read_settings, resolve_model
from tests import inprocess
from tests.predictors.harness import MODEL_NAME, sse, v2_body
from tests.server import ROOT, clean_env


def _usage_error(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """parse_args must exit 2 with one line on stderr (the full usage of ~60 flags would bury it)."""
    with pytest.raises(SystemExit) as exc:
        parse_args(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    return err


def test_kserve_flags_and_vllm_engine_flags_are_split(demo_model_dir: Path):
    s = parse_args(
        [
            "--model_name", "m1",
            "--model_dir", str(demo_model_dir),
            "--http_port", "9999",
            "--max-model-len", "512",
            "--tensor-parallel-size", "1",
            "--enable-prefix-caching",
            "--gpu-memory-utilization=0.8",
            "--max_concurrent_requests", "3",
        ]
    )  # fmt: skip
    assert s.kserve.model_name == "m1" and s.kserve.http_port == 9999 and s.kserve.enable_grpc is False
    assert s.server.max_concurrent_requests == 3 and s.server.model_dir == str(demo_model_dir)
    assert s.engine.model == str(demo_model_dir)
    assert s.engine.served_model_name == ["m1"]
    assert s.engine.max_model_len == 512 and s.engine.enable_prefix_caching is True
    assert s.engine.gpu_memory_utilization == 0.8
    # The engine flags the user gave beat evllm's engine defaults (the CPU KV cache size, for one).
    assert {"--max-model-len", "--gpu-memory-utilization", "--enable-prefix-caching"} <= s.engine_flags
    assert "--http-port" not in s.engine_flags and "--max-concurrent-requests" not in s.engine_flags
    # Batch work runs below online traffic: priority scheduling unless the user chose otherwise.
    assert s.engine.scheduling_policy == "priority"
    fcfs = parse_args(["--model_dir", str(demo_model_dir), "--scheduling-policy", "fcfs"])
    assert fcfs.engine.scheduling_policy == "fcfs"
    assert fcfs.engine.served_model_name == ["model"]  # KServe's default --model_name


def test_model_dir_demo_is_the_demo_model_under_cache_dir(
    cache_dir: Path, demo_model_dir: Path, monkeypatch: pytest.MonkeyPatch
):
    s = parse_args(["--model_name", MODEL_NAME, "--model_dir", "demo", "--cache_dir", str(cache_dir)])
    assert s.engine.model == str(demo_model_dir) and (demo_model_dir / "config.json").is_file()
    assert Path(s.engine.model).is_relative_to(cache_dir)
    # The way the test servers (and a pod) set it: the environment.
    monkeypatch.setenv("EVLLM_CACHE_DIR", str(cache_dir))
    monkeypatch.setenv("EVLLM_MODEL_DIR", "demo")
    assert parse_args([]).engine.model == str(demo_model_dir)


def test_the_default_model_dir_is_kserves_mount(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.delenv("EVLLM_MODEL_DIR", raising=False)
    assert inprocess.settings([]).server.model_dir == "/mnt/models"


def test_model_dir_without_a_model_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    err = _usage_error(["--model_dir", "/nonexistent"], capsys)
    assert err.startswith("evllm serve: error: --model_dir /nonexistent: no model there")
    assert "--model_dir demo" in err and len(err.strip().splitlines()) == 1, err
    # An empty directory (an unfilled /mnt/models) would start with random weights: refused too.
    err = _usage_error(["--model_dir", str(tmp_path)], capsys)
    assert "no model there" in err and len(err.strip().splitlines()) == 1, err


def test_resolve_model_local_directories_and_hub_ids(tmp_path: Path):
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(ServerConfig(model_dir=str(tmp_path))) == str(tmp_path)
    assert resolve_model(ServerConfig(model_dir="org/some-model")) == "org/some-model"
    with pytest.raises(EngineStartFailed, match="missing or empty"):
        resolve_model(ServerConfig(model_dir=str(tmp_path / "file-not-dir")))


def test_usage_errors_exit_2(demo_model_dir: Path, capsys: pytest.CaptureFixture[str]):
    err = _usage_error(["--model_dir", str(demo_model_dir), "--no-such-flag"], capsys)
    assert "unrecognized arguments: --no-such-flag" in err.strip().splitlines()[-1]
    err = _usage_error(["--model_dir", str(demo_model_dir), "some/model"], capsys)
    assert "unexpected positional argument 'some/model'; use --model_dir" in err
    err = _usage_error(["--model_dir", str(demo_model_dir), "--max_concurrent_requests", "many"], capsys)
    assert "--max_concurrent_requests" in err and "'many'" in err and len(err.strip().splitlines()) == 1
    # Abbreviations would silently turn one flag into another (--api_keys into --api_keys_file).
    err = _usage_error(["--model_dir", str(demo_model_dir), "--max_tokens", "5"], capsys)
    assert "--max-tokens" in err or "--max_tokens" in err


def test_workers_are_refused_in_process(capsys: pytest.CaptureFixture[str]):
    parser = build_parser()
    with pytest.raises(SystemExit) as exc:
        read_settings(parser, parser.parse_args(["--workers", "2"]))
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert err == (
        "evllm serve: error: --workers 2: evllm runs one engine per process, so --workers is always 1; "
        "scale with replicas (Knative) instead (see evllm serve --help)\n"
    )
    assert read_settings(parser, parser.parse_args(["--workers", "1"])).kserve.workers == 1


def test_evllm_serve_workers_2_exits_2_with_one_line():
    """The installed command, as a user runs it (it stops before any engine starts)."""
    proc = subprocess.run(
        [sys.executable, "-m", "evllm", "serve", "--model_dir", "demo", "--workers", "2"],
        cwd=ROOT,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert errors == [
        "evllm serve: error: --workers 2: evllm runs one engine per process, so --workers is always 1; "
        "scale with replicas (Knative) instead (see evllm serve --help)"
    ], proc.stderr
    assert "usage:" not in proc.stderr and proc.stdout == ""


# Health, in-process -----------------------------------------------------------------------------------
async def _answers(c: Any) -> dict[str, int]:
    infer = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["hi"]))
    generate = await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "hi"})
    stream = await c.post(f"/v2/models/{MODEL_NAME}/generate_stream", json={"text_input": "hi"})
    predict = await c.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": ["hi"]})
    for r in (infer, generate, stream, predict):
        assert isinstance(r.json()["error"], str) if r.status_code >= 400 else True
    return {
        "live": (await c.get("/v2/health/live")).status_code,
        "ready": (await c.get("/v2/health/ready")).status_code,
        "model_ready": (await c.get(f"/v2/models/{MODEL_NAME}/ready")).status_code,
        "infer": infer.status_code,
        "generate": generate.status_code,
        "generate_stream": stream.status_code,
        "predict": predict.status_code,
    }


def test_health_when_serving():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            assert (await c.get("/v2/health/live")).json() == {"live": True}
            assert (await c.get("/v2/health/ready")).json() == {"ready": True}
            assert (await c.get(f"/v2/models/{MODEL_NAME}/ready")).json()["ready"] is True
            assert (await c.get("/")).status_code == 200

    asyncio.run(main())


# What every probe and protocol answers while the engine cannot generate (starting or dead).
NOT_SERVING = dict.fromkeys(("ready", "model_ready", "infer", "generate", "generate_stream", "predict"), 503)


def test_liveness_answers_while_the_engine_starts(caplog: pytest.LogCaptureFixture):
    # The engine is built off the event loop: a multi-minute GPU start must not fail liveness probes.
    async def main() -> None:
        async with inprocess.server(start=False) as s, s.client() as c:
            assert await _answers(c) == {"live": 200, **NOT_SERVING}
            r = await c.get(f"/v2/models/{MODEL_NAME}/ready")
            assert r.json() == {"error": f"Model with name {MODEL_NAME} is not ready."}
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "hi"})
            assert r.json() == {"error": "Engine is starting, retry later."}
            await s.dataplane.start()
            assert set((await _answers(c)).values()) == {200}

    with caplog.at_level(logging.INFO):
        asyncio.run(main())
    # Not ready is a normal state during a start: no ERROR (with a traceback) per readiness poll.
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info], caplog.text


def test_not_ready_until_the_openai_serving_state_exists():
    """The engine can be up while vLLM's serving state is still being built (adapters loading): readiness
    stays false and OpenAI requests get a JSON 503, not the 500 of a missing handler."""

    async def main() -> None:
        async with inprocess.server(start=False) as s, s.client() as c:
            opened = asyncio.Event()
            release = asyncio.Event()
            openai_start = s.openai.start

            async def slow_openai_start() -> None:
                opened.set()
                await release.wait()
                await openai_start()

            s.openai.start = slow_openai_start  # type: ignore[method-assign]
            starting = asyncio.ensure_future(s.dataplane.start())
            await opened.wait()
            assert s.engine.ready  # the engine is up ...
            assert (await c.get(f"/v2/models/{MODEL_NAME}/ready")).status_code == 503  # ... the server not
            r = await c.post("/openai/v1/completions", json={"model": MODEL_NAME, "prompt": "hi"})
            assert r.status_code == 503 and r.json() == {"error": "Engine is starting, retry later."}
            release.set()
            await starting
            assert (await c.get(f"/v2/models/{MODEL_NAME}/ready")).status_code == 200
            r = await c.post("/openai/v1/completions", json={"model": MODEL_NAME, "prompt": "hi"})
            assert r.status_code == 200

    asyncio.run(main())


def test_engine_death_is_503_and_not_ready():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            s.engine.fake.errored = True
            # Liveness fails too, so the kubelet restarts the pod instead of leaving a zombie replica.
            assert await _answers(c) == {"live": 503, **NOT_SERVING}
            assert (await c.get("/v2/health/live")).json() == {"live": False, "error": "engine is dead"}
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "hi"})
            assert r.json() == {"error": "Engine is dead; the server will be restarted."}
            assert s.engine.fake.requests == []

    asyncio.run(main())


def test_engine_death_mid_stream_ends_the_stream_with_an_in_band_error():
    from vllm.v1.engine.exceptions import EngineDeadError

    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            fake = s.engine.fake
            generate = fake.generate

            async def dies(*args: Any, **kwargs: Any) -> Any:
                async for i, out in _enumerate(generate(*args, **kwargs)):
                    if i == 2:
                        fake.errored = True
                        raise EngineDeadError()
                    yield out

            # The server's hooks wrapped the client's generate at start: wrap beneath them.
            s.engine.client.generate = _rehook(s, dies)
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/generate_stream",
                json={"text_input": "Hello", "parameters": {"max_tokens": 5}},
            )
            # Headers were sent with the first token: the error arrives in-band, as the last event.
            assert r.status_code == 200
            events = sse(r.text)
            assert [e.get("text_output") for e in events[:2]] == ["H", "E"]
            assert events[-1] == {"error": "Engine is dead; the server will be restarted."}
            assert len(events) == 3
            assert (await c.get("/v2/health/live")).status_code == 503

    asyncio.run(main())


async def _enumerate(it: Any) -> Any:
    i = 0
    async for x in it:
        yield i, x
        i += 1


def _rehook(s: inprocess.InProcess, generate: Any) -> Any:
    """`generate` wrapped by the server's engine hooks (metrics and limits), as at engine start."""
    client = type("Client", (), {})()
    client.generate = generate
    for hook in s.dataplane.engine_hooks:
        hook(client)
    return client.generate


def test_draining_is_not_ready_but_live():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            s.engine.draining = True  # what KServe's stop_engine and the SIGTERM handler set
            answers = await _answers(c)
            assert answers["live"] == 200 and answers["ready"] == 503 and answers["model_ready"] == 503
            assert answers["generate"] == 503
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "hi"})
            assert "shutting down" in r.json()["error"]

    asyncio.run(main())


def test_openapi_describes_every_route_but_the_disabled_ones():
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            paths = (await c.get("/openapi.json")).json()["paths"]
            for path in (
                "/v2/models/{model_name}/infer",
                "/v2/models/{model_name}/generate",
                "/v2/models/{model_name}/generate_stream",
                "/v1/models/{model_name}:predict",
                "/openai/v1/completions",
                "/openai/v1/chat/completions",
                "/v2/health/live",
            ):
                assert path in paths, path
            assert not any(p.startswith("/v2/repository/") for p in paths)
            assert s.engine.fake.requests == []

    asyncio.run(main())


@pytest.mark.slow
def test_liveness_answered_while_the_real_engine_started(server):
    # Recorded by the fixture while the session server's engine was starting (a real cold start).
    assert server.live_before_ready


def test_caches_are_set_before_vllm_and_hugging_face_are_imported(
    demo_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """huggingface_hub reads HF_HOME when imported, and vLLM's parser imports it: serve and prepare point
    the caches at --cache_dir before building that parser."""
    from predictors import server

    seen: list[str] = []
    build = server._vllm_parser
    monkeypatch.setattr(server, "_vllm_parser", lambda: (seen.append("vllm parser"), build())[1])
    env: dict[str, str] = {}

    def before(settings: Any) -> None:
        from predictors import compile_cache

        seen.append("caches")
        compile_cache.use(settings.server.cache_dir, env)

    parse_args(["--model_dir", str(demo_model_dir), "--cache_dir", str(tmp_path)], before_vllm=before)
    assert seen == ["caches", "vllm parser"]
    assert env == {"VLLM_CACHE_ROOT": str(tmp_path / "vllm"), "HF_HOME": str(tmp_path / "huggingface")}

"""POST /events on the assembled server (tests/inprocess.py: real middleware, fake engine): what the
server does for eventing through the extension's settings and route policy. Body limit, auth, online
load, metrics and protocol labels, settings from flags and the environment.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent, from_http
from prometheus_client.parser import text_string_to_metric_families

from eventing.config import EventingConfig
from eventing.extension import Eventing
from tests import inprocess
from tests.conftest import Broker

from .fakes import openai_through_engine

API_KEY = "events-key-0123456789"
Sample = tuple[str, tuple[tuple[str, str], ...]]


def server(root: Path, *argv: str, **kwargs: Any) -> Any:
    return inprocess.server(["--storage_roots", str(root), *argv], extensions=[Eventing()], **kwargs)


def event(type_: str, data: Any, id_: str = "e-1", **attrs: Any) -> CloudEvent:
    return CloudEvent({"type": type_, "source": "/tests/server", "id": id_, **attrs}, data)


async def post_event(client: httpx.AsyncClient, ev: CloudEvent, **headers: str) -> httpx.Response:
    ce_headers, body = to_binary(ev)
    return await client.post("/events", headers={**ce_headers, **headers}, content=body)


def reply_of(resp: httpx.Response) -> CloudEvent:
    assert resp.status_code == 200, resp.text
    return from_http(dict(resp.headers), resp.content)


async def scrape(client: httpx.AsyncClient) -> dict[Sample, float]:
    """Every sample the server exports at /metrics, by name and labels."""
    text = (await client.get("/metrics")).text
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def _key(name: str, labels: dict[str, str]) -> Sample:
    return name, tuple(sorted({"model": inprocess.MODEL_NAME, **labels}.items()))


def value(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """A series the server creates at zero before any traffic (so it must be there)."""
    return samples[_key(name, labels)]


def count(samples: dict[Sample, float], name: str, **labels: str) -> float:
    """A series that appears with its first sample (e.g. one per status code)."""
    return samples.get(_key(name, labels), 0.0)


def completion_lines(prompts: list[str], max_tokens: int = 4) -> list[dict[str, Any]]:
    return [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/completions",
             "body": {"model": "demo", "prompt": p, "max_tokens": max_tokens}}
            for i, p in enumerate(prompts)]  # fmt: skip


async def wait_for(path: Path, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not path.exists():
        assert asyncio.get_running_loop().time() < deadline, f"{path} did not appear"
        await asyncio.sleep(0.01)


# Body limit ------------------------------------------------------------------------------------------
def test_events_over_max_event_bytes_are_413_from_the_middleware(tmp_path: Path) -> None:
    """/events has its own limit (--max_event_bytes), enforced by the server's BodyLimit middleware
    before the handler reads anything; other routes keep --max_request_bytes."""

    def submitted(job_id: str, lines: int) -> CloudEvent:
        data = {
            "job_id": job_id,
            "input": completion_lines(["x" * 40] * lines),
            "output": str(tmp_path / "o"),
        }
        return event("dev.evllm.batch.submitted", data, id_=job_id)

    small, big = submitted("fits", 20), submitted("too-big", 40)
    small_size, big_size = len(to_binary(small)[1]), len(to_binary(big)[1])
    assert 1024 < small_size < 4096 < big_size

    async def main() -> None:
        limits = ("--max_request_bytes", "1024", "--max_event_bytes", "4096")
        async with server(tmp_path, *limits) as s, s.client() as c:
            before = await scrape(c)
            # Over --max_request_bytes but under --max_event_bytes: the event's own limit applies.
            assert reply_of(await post_event(c, small))["type"] == "dev.evllm.batch.progress"
            resp = await post_event(c, big)
            assert resp.status_code == 413
            assert resp.json() == {"error": "request body is larger than the limit of 4096 bytes"}
            # No Content-Length (chunked upload): judged by the bytes received.
            headers, body = to_binary(submitted("chunked", 40))

            async def chunks() -> AsyncIterator[bytes]:
                for i in range(0, len(body), 1000):
                    yield body[i : i + 1000]

            resp = await c.post("/events", headers=headers, content=chunks())
            assert resp.status_code == 413 and "4096 bytes" in resp.json()["error"]
            # Every other route keeps --max_request_bytes.
            resp = await c.post("/openai/v1/completions", json={"model": "demo", "prompt": "x" * 2000})
            assert resp.status_code == 413 and "1024 bytes" in resp.json()["error"]
            after = await scrape(c)
        assert not (tmp_path / "o" / "too-big").exists() and not (tmp_path / "o" / "chunked").exists()
        assert (tmp_path / "o" / "fits" / "job.json").exists()
        too_large = {"reason": "payload_too_large"}
        rejected = "evllm_requests_rejected_total"
        assert value(after, rejected, **too_large) - value(before, rejected, **too_large) == 3
        events_413 = {"protocol": "events", "code": "413"}
        assert (
            count(after, "evllm_requests_total", **events_413)
            - count(before, "evllm_requests_total", **events_413)
            == 2
        )

    asyncio.run(main())


# Auth ------------------------------------------------------------------------------------------------
def test_events_need_credentials_when_auth_is_on(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A Trigger delivering to an authenticated predictor must send a key or token (Knative OIDC)."""
    monkeypatch.setenv("EVLLM_API_KEYS", API_KEY)
    ev = event("dev.evllm.inference.request", {"text_input": "hi", "parameters": {"max_tokens": 2}})

    async def main() -> None:
        async with server(tmp_path) as s, s.client() as c:
            resp = await post_event(c, ev)
            assert resp.status_code == 401 and resp.json()["error"]
            assert resp.headers["www-authenticate"].startswith("Bearer")
            assert s.engine.fake.requests == []  # refused before any work
            resp = await post_event(c, ev, Authorization="Bearer wrong-key-0123456789")
            assert resp.status_code == 401
            assert (
                reply_of(await post_event(c, ev, Authorization=f"Bearer {API_KEY}")).data["text_output"]
                == "HI"
            )
            assert reply_of(await post_event(c, ev, **{"X-API-Key": API_KEY})).data["text_output"] == "HI"

    asyncio.run(main())


# Online load, protocol labels and metrics ----------------------------------------------------------------
def test_batch_chunks_are_not_online_load_and_their_engine_work_is_labelled_batch(
    tmp_path: Path, k_sink: Broker
) -> None:
    """Sink mode: the chunk delivered to /events runs its lines at full speed (the route is not online
    load, or the executor would hold it to --batch_online_inflight), below online priority, and its
    tokens count under protocol="batch", not "events"."""
    prompts = ["alpha", "bravo", "charlie", "delta", "echo", "foxtrot"]

    async def main() -> None:
        argv = ("--batch_online_inflight", "1", "--batch_max_inflight", "8")
        async with server(tmp_path, *argv, delay=0.01) as s, s.client() as c:
            calls = openai_through_engine(s)
            before = await scrape(c)
            data = {"job_id": "fast", "input": completion_lines(prompts), "output": str(tmp_path / "o"),
                    "chunk_size": 6}  # fmt: skip
            accepted = reply_of(await post_event(c, event("dev.evllm.batch.submitted", data)))
            assert accepted["type"] == "dev.evllm.batch.progress" and accepted.data["chunks_total"] == 1
            (chunk,) = k_sink.chunks("fast").values()  # emitted to K_SINK, not run here
            assert calls.online == []
            done = reply_of(await post_event(c, chunk))
            assert done["type"] == "dev.evllm.batch.completed"
            assert done.data["request_counts"] == {"total": 6, "completed": 6, "failed": 0}
            after = await scrape(c)
        assert calls.online == [0] * 6
        assert calls.peak == 6
        assert s.engine.fake.priorities == [10] * 6
        prompt_tokens = sum(len(p) for p in prompts)
        completion_tokens = 4 * len(prompts)  # the fake engine: one token per character, max_tokens 4

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        assert delta("evllm_prompt_tokens_total", protocol="batch") == prompt_tokens
        assert delta("evllm_completion_tokens_total", protocol="batch") == completion_tokens
        assert delta("evllm_prompt_tokens_total", protocol="events") == 0
        assert delta("evllm_completion_tokens_total", protocol="events") == 0
        assert (
            count(after, "evllm_requests_total", protocol="events", code="200")
            - count(before, "evllm_requests_total", protocol="events", code="200")
            == 2
        )
        assert delta("evllm_batch_lines_total", outcome="succeeded") == 6
        assert delta("evllm_batch_chunks_total", outcome="completed") == 1
        assert delta("evllm_batch_jobs_total", outcome="accepted") == 1
        assert delta("evllm_batch_jobs_total", outcome="completed") == 1

    asyncio.run(main())


def test_local_mode_engine_work_is_labelled_batch(tmp_path: Path) -> None:
    """No K_SINK: the job runs in a task born inside the /events request; its lines still count as
    protocol="batch" and run below online priority."""
    prompts = ["one", "three", "seven"]

    async def main() -> None:
        async with server(tmp_path) as s, s.client() as c:
            calls = openai_through_engine(s)
            before = await scrape(c)
            data = {"job_id": "local", "input": completion_lines(prompts, max_tokens=2),
                    "output": str(tmp_path / "o"), "chunk_size": 2}  # fmt: skip
            accepted = reply_of(await post_event(c, event("dev.evllm.batch.submitted", data)))
            assert accepted["type"] == "dev.evllm.batch.progress" and accepted.data["chunks_total"] == 2
            await wait_for(tmp_path / "o" / "local" / "result.json")
            after = await scrape(c)
        out = [json.loads(x) for x in (tmp_path / "o" / "local" / "output.jsonl").read_text().splitlines()]
        assert sorted(r["response"]["body"]["choices"][0]["text"] for r in out) == ["ON", "SE", "TH"]
        assert calls.online == [0, 0, 0] and s.engine.fake.priorities == [10, 10, 10]
        for name, expected in (("evllm_prompt_tokens_total", 13), ("evllm_completion_tokens_total", 6)):
            assert value(after, name, protocol="batch") - value(before, name, protocol="batch") == expected
            assert value(after, name, protocol="events") == value(before, name, protocol="events")

    asyncio.run(main())


def test_inference_events_are_online_load_counted_once(tmp_path: Path) -> None:
    """An inference.request is online work: its handler counts it (the middleware does not count
    /events, so it is 1, not 2), like an OpenAI request the middleware counts."""

    async def main() -> None:
        async with server(tmp_path) as s, s.client() as c:
            calls = openai_through_engine(s)
            data = {"messages": [{"role": "user", "content": "hey"}], "parameters": {"max_tokens": 3}}
            reply = reply_of(await post_event(c, event("dev.evllm.inference.request", data)))
            assert reply.data["text_output"] == "HEY"
            resp = await c.post(
                "/openai/v1/completions", json={"model": "demo", "prompt": "yo", "max_tokens": 2}
            )
            assert resp.status_code == 200 and resp.json()["choices"][0]["text"] == "YO"
            assert s.dataplane.online_load == 0
        assert calls.online == [1, 1]
        assert s.engine.fake.priorities == [0, 0]

    asyncio.run(main())


# Engine errors -----------------------------------------------------------------------------------------
def test_engine_errors_on_events_are_retryable_or_client_errors(tmp_path: Path) -> None:
    """Engine still starting: 503 (Knative retries). A prompt the engine refuses: 400 (dead letter)."""
    ev = event("dev.evllm.inference.request", {"text_input": "hi"})

    async def main() -> None:
        async with server(tmp_path, start=False) as s, s.client() as c:
            resp = await post_event(c, ev)
            assert resp.status_code == 503 and "starting" in resp.json()["error"]
            await s.dataplane.start()
            assert reply_of(await post_event(c, ev)).data["text_output"] == "HI"  # the retry is computed
            # 60 prompt tokens + max_tokens 10 do not fit the fake engine's 64-token context.
            data = {"text_input": "x" * 60, "parameters": {"max_tokens": 10}}
            resp = await post_event(c, event("dev.evllm.inference.request", data, id_="e-2"))
            assert resp.status_code == 400 and "maximum context length" in resp.json()["error"]
            structured_headers, body = to_structured(event("dev.evllm.inference.request", data, id_="e-3"))
            resp = await c.post("/events", headers=structured_headers, content=body)
            assert resp.status_code == 400 and "maximum context length" in resp.json()["error"]

    asyncio.run(main())


# Settings ------------------------------------------------------------------------------------------------
ENV = {
    "EVLLM_EVENTS_PREFIX": "com.acme",
    "EVLLM_STORAGE_ROOTS": "/data/a, /data/b",
    "EVLLM_BATCH_CHUNK_SIZE": "7",
    "EVLLM_BATCH_MAX_INFLIGHT": "32",
    "EVLLM_BATCH_ONLINE_INFLIGHT": "3",
    "EVLLM_MAX_EVENT_BYTES": "4096",
    "EVLLM_MAX_BATCH_LINES": "100",
    "K_SINK": "http://broker-ingress.knative-eventing.svc.cluster.local/default/evllm",
}


def eventing_settings(*argv: str) -> EventingConfig:
    settings = inprocess.settings(argv, [Eventing()]).extensions["eventing"]
    assert isinstance(settings, EventingConfig)
    return settings


def test_eventing_settings_come_from_the_environment_and_flags_beat_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for name in [*ENV, "EVLLM_SINK"]:
        monkeypatch.delenv(name, raising=False)
    assert eventing_settings() == EventingConfig()
    assert EventingConfig().sink is None and EventingConfig().storage_roots == ["./evllm-data"]
    for name, text in ENV.items():
        monkeypatch.setenv(name, text)
    assert eventing_settings() == EventingConfig(
        events_prefix="com.acme",
        storage_roots=["/data/a", "/data/b"],
        batch_chunk_size=7,
        batch_max_inflight=32,
        batch_online_inflight=3,
        max_event_bytes=4096,
        max_batch_lines=100,
        sink=ENV["K_SINK"],
    )
    flags = eventing_settings(
        "--events_prefix", "org.x", "--storage_roots", "/only", "--batch_chunk_size", "9",
        "--max_event_bytes", "100", "--sink", "http://flag-sink",
    )  # fmt: skip
    assert (flags.events_prefix, flags.storage_roots, flags.batch_chunk_size) == ("org.x", ["/only"], 9)
    assert (flags.max_event_bytes, flags.sink) == (100, "http://flag-sink")
    assert flags.batch_max_inflight == 32  # not given as a flag: still the environment's
    assert flags.roots == [Path("/only")] and flags.type("batch.chunk") == "org.x.batch.chunk"
    # The sink's variable is Knative's K_SINK, not EVLLM_SINK.
    monkeypatch.delenv("K_SINK")
    monkeypatch.setenv("EVLLM_SINK", "http://not-read")
    assert eventing_settings().sink is None


def test_bad_eventing_settings_are_one_line_errors(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        eventing_settings("--batch_chunk_size", "0")
    assert info.value.code == 2
    assert "--batch_chunk_size must be at least 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        eventing_settings("--max_event_bytes", "lots")
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--max_event_bytes" in err and "'lots'" in err


def test_help_lists_the_eventing_group_with_its_variables() -> None:
    from predictors.server import build_parser

    text = build_parser([Eventing()]).format_help()
    assert "CloudEvents (POST /events), batch jobs, OpenAI Files + Batches API" in text
    for flag, var in [("--events_prefix", "EVLLM_EVENTS_PREFIX"), ("--storage_roots", "EVLLM_STORAGE_ROOTS"),
                      ("--max_event_bytes", "EVLLM_MAX_EVENT_BYTES"), ("--sink", "K_SINK")]:  # fmt: skip
        assert flag in text and var in text


def test_environment_settings_take_effect_in_the_server(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("EVLLM_EVENTS_PREFIX", "com.acme")
    monkeypatch.setenv("EVLLM_MAX_EVENT_BYTES", "2048")
    monkeypatch.setenv("EVLLM_STORAGE_ROOTS", str(tmp_path))

    async def main() -> None:
        async with inprocess.server(extensions=[Eventing()]) as s, s.client() as c:
            ok = event("com.acme.inference.request", {"text_input": "hi"})
            assert reply_of(await post_event(c, ok))["type"] == "com.acme.inference.response"
            resp = await post_event(c, event("dev.evllm.inference.request", {"text_input": "hi"}))
            assert resp.status_code == 400 and "com.acme.inference.request" in resp.json()["error"]
            resp = await post_event(c, event("com.acme.inference.request", {"text_input": "x" * 3000}))
            assert resp.status_code == 413 and "2048 bytes" in resp.json()["error"]
            data = {"job_id": "j", "input": completion_lines(["a"]), "output": str(tmp_path / "o")}
            accepted = reply_of(await post_event(c, event("com.acme.batch.submitted", data)))
            assert accepted["type"] == "com.acme.batch.progress"
            await wait_for(tmp_path / "o" / "j" / "result.json")
            outside = {**data, "output": str(tmp_path.parent / "elsewhere")}
            failed = reply_of(await post_event(c, event("com.acme.batch.submitted", outside, id_="e-2")))
            assert failed["type"] == "com.acme.batch.failed" and "outside" in failed.data["error"]

    asyncio.run(main())

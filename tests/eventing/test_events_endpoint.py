"""POST /events with an engine-free data plane: reply types, correlation, status codes, dedup."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from cloudevents.conversion import to_binary, to_structured
from cloudevents.http import CloudEvent, from_http

from .fakes import FakeDataPlane, events_client
from .test_cloudevents import INVALID

REQUEST = "dev.evllm.inference.request"


def request_event(data: object, **attrs: object) -> CloudEvent:
    base = {"type": REQUEST, "source": "/tests", "id": "req-1", "subject": "greeting", "model": "demo"}
    return CloudEvent({**base, **attrs}, data)


@pytest.mark.parametrize("mode", [to_binary, to_structured])
def test_inference_reply_is_correlated(tmp_path: Path, mode) -> None:
    async def main() -> None:
        dp = FakeDataPlane()
        async with events_client(dp, tmp_path) as client:
            headers, body = mode(
                request_event({"text_input": "hi", "parameters": {"max_tokens": 3}, "id": "c1"})
            )
            resp = await client.post("/events", headers=headers, content=body)
            assert resp.status_code == 200, resp.text
            reply = from_http(dict(resp.headers), resp.content)
            assert reply["type"] == "dev.evllm.inference.response"
            assert reply["requestid"] == "req-1" and reply["requestsource"] == "/tests"
            assert reply["subject"] == "greeting" and reply["model"] == "demo"
            assert reply.data["text_output"] == "HI" and reply.data["id"] == "c1"
            assert reply.data["usage"] == {"prompt_tokens": 2, "completion_tokens": 3}
            # The reply comes back in the request's mode.
            assert ("ce-id" in resp.headers) == (mode is to_binary)

    asyncio.run(main())


def test_chat_inference(tmp_path: Path) -> None:
    async def main() -> None:
        dp = FakeDataPlane()
        async with events_client(dp, tmp_path) as client:
            data = {"messages": [{"role": "user", "content": "yo"}], "parameters": {"temperature": 0}}
            headers, body = to_binary(request_event(data))
            resp = await client.post("/events", headers=headers, content=body)
            assert resp.status_code == 200, resp.text
            reply = from_http(dict(resp.headers), resp.content)
            assert reply.data["text_output"] == "YO"
            url, sent, priority = dp.calls[0]
            assert url == "/v1/chat/completions" and sent["temperature"] == 0 and priority == 0

    asyncio.run(main())


def test_redelivery_returns_the_same_reply_without_recomputing(tmp_path: Path) -> None:
    async def main() -> None:
        dp = FakeDataPlane()
        async with events_client(dp, tmp_path) as client:
            headers, body = to_binary(request_event({"text_input": "once"}))
            first, second = await asyncio.gather(
                client.post("/events", headers=headers, content=body),
                client.post("/events", headers=headers, content=body),
            )
            third = await client.post("/events", headers=headers, content=body)
            ids = {r.headers["ce-id"] for r in (first, second, third)}
            assert len(ids) == 1 and dp.generated == ["once"]

    asyncio.run(main())


@pytest.mark.parametrize("case", INVALID, ids=[c["id"] for c in INVALID])
def test_every_invalid_conformance_event_is_a_json_400(tmp_path: Path, case: dict) -> None:
    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path) as client:
            resp = await client.post(
                "/events", content=json.dumps(case["event"]),
                headers={"content-type": "application/cloudevents+json"},
            )  # fmt: skip
            assert resp.status_code == 400
            assert resp.json()["error"]

    asyncio.run(main())


@pytest.mark.parametrize(
    ("event", "status", "fragment"),
    [
        (request_event({"text_input": "x"}, type="dev.evllm.other"), 400, "unsupported event type"),
        (request_event({"text_input": "x"}, model="llama"), 400, "not served here"),
        (request_event({"prompt": "x"}), 400, "exactly one of text_input or messages"),
        (request_event("just text"), 400, "JSON object"),
        (request_event({"text_input": "x", "parameters": {"bogus": 1}}), 400, "parameters.bogus"),
        (request_event({"text_input": "x", "extra": 1}), 400, "extra"),
        (request_event({"text_input": ""}), 400, "text_input"),
    ],
)
def test_client_errors_are_400_with_a_message(
    tmp_path: Path, event: CloudEvent, status: int, fragment: str
) -> None:
    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path) as client:
            headers, body = to_binary(event)
            resp = await client.post("/events", headers=headers, content=body)
            assert resp.status_code == status
            assert fragment in resp.json()["error"]

    asyncio.run(main())


def test_engine_not_ready_is_503_so_knative_retries(tmp_path: Path) -> None:
    async def main() -> None:
        dp = FakeDataPlane()
        dp.ready = False
        async with events_client(dp, tmp_path) as client:
            headers, body = to_binary(request_event({"text_input": "x"}))
            resp = await client.post("/events", headers=headers, content=body)
            assert resp.status_code == 503 and "starting" in resp.json()["error"]
            dp.ready = True  # the retry (same id) is computed, not served from a failed cache entry
            resp = await client.post("/events", headers=headers, content=body)
            assert resp.status_code == 200

    asyncio.run(main())


def test_inference_counts_as_online_load(tmp_path: Path) -> None:
    seen: list[int] = []

    async def main() -> None:
        dp = FakeDataPlane()
        original = dp.generate

        async def generate(*a, **kw):
            seen.append(dp.online_load)
            return await original(*a, **kw)

        dp.generate = generate  # type: ignore[method-assign]
        async with events_client(dp, tmp_path) as client:
            headers, body = to_binary(request_event({"text_input": "x"}))
            assert (await client.post("/events", headers=headers, content=body)).status_code == 200
        assert dp.online_load == 0

    asyncio.run(main())
    assert seen == [1]


def test_the_model_extension_addresses_an_adapter(tmp_path: Path) -> None:
    """A LoRA adapter's name in the `model` extension runs through that adapter (the fake lower-cases),
    and the reply carries it; an unknown name is a 400 naming every served model."""

    async def main() -> None:
        dp = FakeDataPlane(adapters=("ad1",))
        async with events_client(dp, tmp_path) as client:
            headers, body = to_binary(request_event({"text_input": "Hi"}, model="ad1"))
            resp = await client.post("/events", headers=headers, content=body)
            assert resp.status_code == 200, resp.text
            reply = from_http(dict(resp.headers), resp.content)
            assert reply["model"] == "ad1" and reply.data["model_name"] == "ad1"
            assert reply.data["text_output"] == "hi"
            headers, body = to_binary(request_event({"text_input": "Hi"}, model="ad9", id="req-2"))
            resp = await client.post("/events", headers=headers, content=body)
            assert resp.status_code == 400
            assert (
                resp.json()["error"] == "model 'ad9' is not served here (this predictor serves 'demo', 'ad1')"
            )

    asyncio.run(main())

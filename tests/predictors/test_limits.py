"""Limits: body bytes (413), prompts per request, prompt tokens and max_tokens (400; 422 on generate).

The Limits object, then the assembled server in-process over the fake engine (one token per character,
context 64). The OpenAI checks that need vLLM's tokenizer run on the `restarted` server
(--max_prompt_tokens 48, --max_tokens_limit 24, API key auth).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from vllm.exceptions import VLLMValidationError

from eventing.extension import Eventing
from predictors.errors import InvalidInput, PayloadTooLarge
from predictors.limits import Limits
from tests import inprocess
from tests.conftest import API_KEY, MAX_PROMPT_TOKENS, MAX_TOKENS_LIMIT
from tests.predictors.harness import MODEL_NAME, v2_body

MiB = 1024 * 1024


def test_flags_and_environment_build_the_limits(monkeypatch: pytest.MonkeyPatch):
    for name in ("EVLLM_MAX_REQUEST_BYTES", "EVLLM_MAX_PROMPT_TOKENS", "EVLLM_MAX_TOKENS_LIMIT"):
        monkeypatch.delenv(name, raising=False)
    limits = inprocess.settings([]).limits
    assert limits == Limits(8 * MiB, 64, None, None)
    monkeypatch.setenv("EVLLM_MAX_PROMPT_TOKENS", "100")
    monkeypatch.setenv("EVLLM_MAX_TOKENS_LIMIT", "50")
    limits = inprocess.settings(["--max_tokens_limit", "9", "--max_prompts_per_request", "2"]).limits
    assert limits.max_tokens_limit == 9 and limits.max_prompt_tokens == 100
    assert limits.max_prompts_per_request == 2 and limits.max_request_bytes == 8 * MiB


def test_checks_name_the_limit():
    limits = Limits(max_prompts_per_request=2, max_prompt_tokens=5, max_tokens_limit=10)
    limits.check_prompts(2)
    with pytest.raises(InvalidInput, match="3 prompts in one request; the limit is 2"):
        limits.check_prompts(3)
    limits.check_prompt_tokens(5)
    with pytest.raises(InvalidInput, match="prompt has 6 tokens; the limit is 5"):
        limits.check_prompt_tokens(6)
    limits.check_max_tokens(10)
    limits.check_max_tokens(None)
    with pytest.raises(InvalidInput, match="max_tokens=11 is above the limit of 10"):
        limits.check_max_tokens(11)
    limits.check_body_size(10, 10)
    with pytest.raises(PayloadTooLarge, match="larger than the limit of 10 bytes"):
        limits.check_body_size(11, 10)
    with pytest.raises(InvalidInput, match="max_completion_tokens=11"):
        limits.check_openai_body(b'{"max_completion_tokens": 11}')
    with pytest.raises(InvalidInput, match="max_tokens=11"):
        limits.check_openai_body(b'{"max_tokens": 11, "max_completion_tokens": 1}')
    # Not the limit's business: vLLM answers these with its own 400 (or accepts them).
    for body in (b"not json", b"[1]", b'{"max_tokens": "11"}', b'{"max_tokens": true}', b"\xff"):
        limits.check_openai_body(body)
    # Unset limits limit nothing.
    unlimited = Limits()
    unlimited.check_prompt_tokens(10**6)
    unlimited.check_max_tokens(10**6)
    unlimited.check_openai_body(b'{"max_tokens": 1000000}')


def test_max_tokens_above_the_limit_is_refused_and_unset_is_clamped():
    limits = Limits(max_tokens_limit=10)
    sp = SimpleNamespace(max_tokens=20)
    limits.apply_max_tokens(sp, None)
    assert sp.max_tokens == 10
    sp = SimpleNamespace(max_tokens=7)
    limits.apply_max_tokens(sp, 7)
    assert sp.max_tokens == 7
    with pytest.raises(InvalidInput, match="limit of 10"):
        limits.apply_max_tokens(SimpleNamespace(max_tokens=11), 11)


def test_engine_check_refuses_long_prompts_and_clamps_max_tokens():
    # The last line before the engine, for every path (OpenAI's included).
    limits = Limits(max_prompt_tokens=3, max_tokens_limit=4)
    with pytest.raises(VLLMValidationError, match="prompt has 4 tokens; the limit is 3"):
        limits.engine_check({"prompt_token_ids": [1, 2, 3, 4]}, SimpleNamespace(max_tokens=1))
    sp = SimpleNamespace(max_tokens=None)
    limits.engine_check({"prompt_token_ids": [1, 2, 3]}, sp)
    assert sp.max_tokens is None  # unset stays unset (vLLM fills it in from the context)
    sp = SimpleNamespace(max_tokens=100)
    limits.engine_check({"prompt": "text"}, sp)
    assert sp.max_tokens == 4


# The assembled server, in-process --------------------------------------------------------------------
MAX_REQUEST_BYTES = 32 * 1024
MAX_EVENT_BYTES = 64 * 1024
MAX_PROMPTS = 3
PROMPT_TOKENS = 20
TOKENS_LIMIT = 8
LIMITED = [
    "--max_request_bytes", str(MAX_REQUEST_BYTES),
    "--max_prompts_per_request", str(MAX_PROMPTS),
    "--max_prompt_tokens", str(PROMPT_TOKENS),
    "--max_tokens_limit", str(TOKENS_LIMIT),
]  # fmt: skip


def test_body_size_limits(tmp_path: Path):
    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(MAX_REQUEST_BYTES // 1024 + 2):
            yield b"x" * 1024

    async def main() -> None:
        argv = [*LIMITED, "--max_event_bytes", str(MAX_EVENT_BYTES), "--storage_roots", str(tmp_path)]
        async with inprocess.server(argv, extensions=[Eventing()]) as s, s.client() as c:
            big = {"text_input": "x" * (MAX_REQUEST_BYTES + 10)}
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", json=big)
            assert r.status_code == 413 and str(MAX_REQUEST_BYTES) in r.json()["error"]
            # Chunked upload (no Content-Length): counted as it arrives.
            r = await c.post("/openai/v1/completions", content=chunks())
            assert "content-length" not in r.request.headers
            assert r.status_code == 413 and "larger than" in r.json()["error"]
            # Events have their own, larger limit.
            r = await c.post("/events", content=b"{" + b" " * (MAX_EVENT_BYTES + 1) + b"}")
            assert r.status_code == 413 and str(MAX_EVENT_BYTES) in r.json()["error"]
            mid = b'{"data": "' + b"x" * (MAX_REQUEST_BYTES + 100) + b'"}'
            r = await c.post("/events", content=mid, headers={"content-type": "application/cloudevents+json"})
            assert r.status_code == 400, r.text  # past the request limit, within the event limit: a bad event
            # Nothing too large reached the engine or vLLM's OpenAI layer.
            assert s.engine.fake.requests == [] and s.openai.calls == []
            # At the limit exactly: served.
            edge = b'{"text_input": "' + b"a" * (MAX_REQUEST_BYTES - 18) + b'"}'
            assert len(edge) == MAX_REQUEST_BYTES
            r = await c.post(f"/v2/models/{MODEL_NAME}/generate", content=edge)
            assert r.status_code == 422 and "maximum context length" in r.json()["error"]

    asyncio.run(main())


def test_prompt_count_prompt_tokens_and_max_tokens():
    async def main() -> None:
        async with inprocess.server(LIMITED) as s, s.client() as c:
            too_many = ["a"] * (MAX_PROMPTS + 1)
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(too_many))
            assert (
                r.status_code == 400
                and r.json()["error"] == f"4 prompts in one request; the limit is {MAX_PROMPTS}"
            )
            r = await c.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": too_many})
            assert r.status_code == 400 and f"the limit is {MAX_PROMPTS}" in r.json()["error"]

            long_prompt = "x" * (PROMPT_TOKENS + 1)
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body([long_prompt]))
            assert (
                r.status_code == 400
                and r.json()["error"] == f"prompt has 21 tokens; the limit is {PROMPT_TOKENS}"
            )
            r = await c.post(f"/v1/models/{MODEL_NAME}:predict", json={"instances": [long_prompt]})
            assert r.status_code == 400 and f"the limit is {PROMPT_TOKENS}" in r.json()["error"]
            for path in ("generate", "generate_stream"):
                r = await c.post(f"/v2/models/{MODEL_NAME}/{path}", json={"text_input": long_prompt})
                assert r.status_code == 422 and f"the limit is {PROMPT_TOKENS}" in r.json()["error"]

            over = {"max_tokens": TOKENS_LIMIT + 1}
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["hi"], over))
            assert r.status_code == 400 and f"limit of {TOKENS_LIMIT}" in r.json()["error"]
            r = await c.post(
                f"/v2/models/{MODEL_NAME}/generate", json={"text_input": "hi", "parameters": over}
            )
            assert r.status_code == 422 and f"limit of {TOKENS_LIMIT}" in r.json()["error"]
            r = await c.post(
                f"/v1/models/{MODEL_NAME}:predict", json={"instances": ["hi"], "parameters": over}
            )
            assert r.status_code == 400 and f"limit of {TOKENS_LIMIT}" in r.json()["error"]
            # OpenAI bodies asking for more than the limit never reach vLLM.
            chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]}
            r = await c.post("/openai/v1/chat/completions", json={**chat, "max_completion_tokens": 9999})
            assert r.status_code == 400 and r.json() == {
                "error": "max_completion_tokens=9999 is above the limit of 8"
            }
            r = await c.post("/openai/v1/completions", json={"prompt": "hi", "max_tokens": TOKENS_LIMIT + 1})
            assert r.status_code == 400 and f"limit of {TOKENS_LIMIT}" in r.json()["error"]
            assert s.engine.fake.requests == [] and s.openai.calls == []

            # Within every limit: served; an unset max_tokens (default 20) is clamped to the limit.
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["a" * PROMPT_TOKENS, "b", "c"]))
            assert r.status_code == 200, r.text
            out = {o["name"]: o["data"] for o in r.json()["outputs"]}
            assert out["text_output"] == ["A" * TOKENS_LIMIT, "B", "C"]
            assert out["completion_tokens"] == [TOKENS_LIMIT, 1, 1]
            assert out["finish_reason"] == ["length", "eos_token", "eos_token"]
            r = await c.post(
                "/openai/v1/chat/completions", json={**chat, "max_completion_tokens": TOKENS_LIMIT}
            )
            assert r.status_code == 200 and s.openai.calls[-1][1]["max_completion_tokens"] == TOKENS_LIMIT

    asyncio.run(main())


def test_context_length_is_checked_with_max_tokens():
    # The fake engine's context is 64 tokens: prompt + max_tokens past it is the client's mistake.
    async def main() -> None:
        async with inprocess.server() as s, s.client() as c:
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["x" * 50], {"max_tokens": 15}))
            assert r.status_code == 400 and "maximum context length is 64" in r.json()["error"]
            r = await c.post(f"/v2/models/{MODEL_NAME}/infer", json=v2_body(["x" * 50], {"max_tokens": 14}))
            assert r.status_code == 200

    asyncio.run(main())


# The restarted server: vLLM's tokenizer and OpenAI layer -------------------------------------------
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@pytest.mark.slow
@pytest.mark.lifecycle("restarted")
def test_openai_prompt_tokens_and_unset_max_tokens_on_the_real_engine(restarted):
    url = restarted.url
    long_prompt = " ".join(["hello world"] * MAX_PROMPT_TOKENS)
    r = httpx.post(
        f"{url}/openai/v1/completions",
        json={"model": MODEL_NAME, "prompt": long_prompt, "max_tokens": 4},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400, r.text
    assert f"the limit is {MAX_PROMPT_TOKENS}" in r.json()["error"]["message"]
    chat = {"model": MODEL_NAME, "messages": [{"role": "user", "content": long_prompt}], "max_tokens": 4}
    r = httpx.post(f"{url}/openai/v1/chat/completions", json=chat, headers=AUTH, timeout=60)
    assert r.status_code == 400 and f"the limit is {MAX_PROMPT_TOKENS}" in r.json()["error"]["message"]
    # V2 counts the prompt with the same tokenizer.
    r = httpx.post(
        f"{url}/v2/models/{MODEL_NAME}/infer", json=v2_body([long_prompt]), headers=AUTH, timeout=60
    )
    assert r.status_code == 400 and f"the limit is {MAX_PROMPT_TOKENS}" in r.json()["error"]
    # Unset max_tokens on OpenAI chat ("until the context is full") is clamped to the limit, not refused.
    r = httpx.post(
        f"{url}/openai/v1/chat/completions",
        json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "Hello"}], "ignore_eos": True},
        headers=AUTH,
        timeout=120,
    )
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["completion_tokens"] == MAX_TOKENS_LIMIT
    r = httpx.post(
        f"{url}/openai/v1/completions",
        json={"model": MODEL_NAME, "prompt": "Hello", "max_tokens": MAX_TOKENS_LIMIT + 1},
        headers=AUTH,
        timeout=60,
    )
    assert r.status_code == 400 and f"limit of {MAX_TOKENS_LIMIT}" in r.json()["error"]
    # Credentials are required on the restarted server.
    r = httpx.post(f"{url}/openai/v1/completions", json={"model": MODEL_NAME, "prompt": "Hello"}, timeout=30)
    assert r.status_code == 401

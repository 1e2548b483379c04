"""OpenAI completions/chat/models through vLLM's own serving classes, with the openai client, on the
session server (the in-process server's OpenAI sub-app is a fake: auth, limits and admission in front of it
are tested in test_auth, test_limits and test_admission)."""

import openai
import pytest

from tests.conftest import ADAPTER_NAME, MODEL_NAME, REFERENCE_MAX_TOKENS, REFERENCE_PROMPTS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def client(server):
    with openai.OpenAI(base_url=server.url + "/openai/v1", api_key="unused", max_retries=0) as c:
        yield c


def test_models(client):
    assert [m.id for m in client.models.list().data] == [MODEL_NAME, ADAPTER_NAME]


def test_completions_token_identical_to_offline(client, offline_reference):
    res = client.completions.create(
        model=MODEL_NAME,
        prompt=REFERENCE_PROMPTS,
        max_tokens=REFERENCE_MAX_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    )
    by_index = sorted(res.choices, key=lambda c: c.index)
    assert [c.text for c in by_index] == [r["text"] for r in offline_reference]
    assert [c.model_extra["token_ids"] for c in by_index] == [r["token_ids"] for r in offline_reference]


def test_completions_stream(client, offline_reference):
    stream = client.completions.create(
        model=MODEL_NAME,
        prompt=REFERENCE_PROMPTS[2],
        max_tokens=REFERENCE_MAX_TOKENS,
        temperature=0,
        stream=True,
    )
    chunks = [c.choices[0].text for c in stream if c.choices]
    assert len(chunks) > 1
    assert "".join(chunks) == offline_reference[2]["text"]


def test_chat_uses_the_models_chat_template(client):
    res = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    # "<|begin_of_text|><|user|>hi\n<|assistant|>" is 6 tokens with the demo tokenizer.
    assert res.usage.prompt_tokens == 6
    assert res.usage.completion_tokens == 5
    assert res.choices[0].message.role == "assistant"


def test_chat_stream_joins_to_the_unary_answer(client):
    stream = client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": "hi"}],
        max_tokens=5,
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    full = client.chat.completions.create(
        model=MODEL_NAME, messages=[{"role": "user", "content": "hi"}], max_tokens=5, temperature=0
    )
    assert text == full.choices[0].message.content


def test_openai_errors_are_4xx(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="a", max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="a", max_tokens=2, temperature=-3)
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL_NAME, prompt="hello " * 1500, max_tokens=2)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=MODEL_NAME, messages="hi", max_tokens=2)

"""A client that goes away aborts its generation in the engine (streaming and not).

Observable: the engine's generated-token counter stops well short of what the request asked for.
"""

import re
import time

import httpx
import pytest

from tests.conftest import MODEL_NAME

pytestmark = pytest.mark.slow
MAX_TOKENS = 900
LONG = {"max_tokens": MAX_TOKENS, "ignore_eos": True, "temperature": 0}


def _generated(server) -> float:
    text = httpx.get(server.url + "/metrics").text
    return sum(
        float(m.group(1))
        for line in text.splitlines()
        if (m := re.match(r"^vllm:generation_tokens_total(?:\{.*\})? (\S+)$", line))
    )


def _settled(server) -> float:
    """The token counter once it stops moving (the engine finished or aborted everything)."""
    last = _generated(server)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        time.sleep(1.0)
        now = _generated(server)
        if now == last:
            return now
        last = now
    raise AssertionError("engine kept generating for 60 s")


def test_stream_disconnect_aborts(server):
    before = _settled(server)
    with httpx.stream(
        "POST",
        f"{server.url}/v2/models/{MODEL_NAME}/generate_stream",
        json={"text_input": "Hello", "parameters": LONG},
        timeout=30,
    ) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 3:
                break
    generated = _settled(server) - before
    assert 0 < generated < MAX_TOKENS


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("generate", {"text_input": "Hello", "parameters": LONG}),
        (
            "infer",
            {
                "inputs": [{"name": "text_input", "datatype": "BYTES", "shape": [1], "data": ["Hello"]}],
                "parameters": LONG,
            },
        ),
    ],
)
def test_unary_disconnect_aborts(server, path, body):
    before = _settled(server)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{server.url}/v2/models/{MODEL_NAME}/{path}", json=body, timeout=0.5)
    generated = _settled(server) - before
    assert generated < MAX_TOKENS

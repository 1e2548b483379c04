"""`python -m bench.ceiling`'s parts without an engine: the in-process closed loop over the real data plane
(fake engine) and the pairing of its windows with `vllm serve`'s. The whole run starts three engines and
is a benchmark, not a test."""

from __future__ import annotations

import asyncio

import pytest

from bench.ceiling import in_process_loop, summarize
from bench.load import LoadResult
from tests import inprocess

PROMPTS = ["x" * 32, "y" * 32]  # the fake engine echoes the prompt: 32 characters make 32 tokens


def test_in_process_loop_counts_what_finishes_in_the_window() -> None:
    async def main() -> tuple[LoadResult, int]:
        async with inprocess.server(delay=0.001) as s:
            res = await in_process_loop(s.dataplane, 4, 0.1, 0.4, prompts=PROMPTS, max_tokens=32)
            return res, len(s.engine.fake.requests)

    res, calls = asyncio.run(main())
    assert res.protocol == "in-process" and res.concurrency == 4 and res.errors == 0
    # 4 workers, ~32 ms a request: the warmup's requests and the last ones past the window don't count.
    assert 0 < res.requests < calls
    assert res.tok_s == pytest.approx(res.requests * 32 / 0.4)
    assert 0 < res.p50 <= res.p95 <= res.p99


def test_in_process_loop_refuses_a_short_answer() -> None:
    async def main() -> None:
        async with inprocess.server() as s:
            await in_process_loop(s.dataplane, 1, 0.0, 0.2, prompts=["short"], max_tokens=32)

    with pytest.raises(RuntimeError, match="in-process: 5 completion tokens, expected 32"):
        asyncio.run(main())


def test_each_window_is_divided_by_the_vllm_windows_beside_it() -> None:
    def row(window: int, server: str, protocol: str, tok_s: float) -> dict[str, object]:
        return {"repeat": 0, "window": window, "server": server, "protocol": protocol,
                "tok_s": tok_s, "req_s": tok_s / 32}  # fmt: skip

    rows = [
        row(1, "vllm", "openai", 100.0),
        row(2, "evllm", "v2-generate", 110.0),
        row(3, "vllm", "openai", 120.0),
        row(4, "evllm", "in-process", 150.0),
        row(5, "vllm", "openai", 80.0),
        row(6, "evllm", "v2-generate", 99.0),
        row(7, "vllm", "openai", 100.0),
    ]
    s = summarize(rows)
    assert s["v2-generate"]["ratios"] == pytest.approx([1.0, 1.1])
    assert s["in-process"]["ratios"] == pytest.approx([1.5])
    assert s["v2-generate"]["ratio"] == pytest.approx(1.05)
    assert s["in-process"]["req_s"] == pytest.approx(150.0 / 32)

"""`evllm batch submit|status` and `evllm send` argument wiring; submit against a recording sink, status on
a finished and an unfinished job (no engine)."""

from __future__ import annotations

import argparse
import asyncio
import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from eventing import cli
from tests.conftest import Broker

from .batchdata import mixed_lines
from .fakes import FakeDataPlane, events_client


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="evllm")
    cli.add_parsers(p.add_subparsers(dest="command", required=True))
    return p


def test_parsers_set_functions() -> None:
    p = parser()
    args = p.parse_args(["send", "http://x/events", "--type", "t", "--data", "{}", "--structured",
                         "--extension", "a=b"])  # fmt: skip
    assert args.func is cli.send_command and args.binary is False and args.extension == ["a=b"]
    args = p.parse_args(["batch", "submit", "http://x", "--input", "in.jsonl", "--output", "/o", "--job_id", "j",
                         "--chunk_size", "8", "--events_prefix", "com.acme"])  # fmt: skip
    assert args.func is cli.submit_command
    assert (args.job_id, args.chunk_size, args.events_prefix) == ("j", 8, "com.acme")
    args = p.parse_args(["batch", "status", "/o", "--job_id", "j"])
    assert args.func is cli.status_command


@pytest.mark.parametrize("old", ["--job-id", "--chunk-size", "--prefix", "--model"])
def test_client_flags_have_one_spelling(old: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parser().parse_args(["batch", "submit", "http://x", "--input", "i", "--output", "/o", old, "1"])
    assert "unrecognized arguments" in capsys.readouterr().err


@pytest.fixture
def ingress() -> Iterator[Broker]:
    """A broker ingress that records the events posted to it."""
    b = Broker()
    b.thread.start()
    yield b
    b.server.shutdown()
    b.server.server_close()


def test_batch_submit_posts_the_event(
    ingress: Broker, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    lines = [
        json.dumps({"custom_id": f"c{i}", "url": "/v1/completions", "body": {"prompt": "x"}})
        for i in range(2)
    ]
    (tmp_path / "in.jsonl").write_text("\n".join(lines) + "\n\n")
    monkeypatch.chdir(tmp_path)
    args = parser().parse_args(["batch", "submit", ingress.url, "--input", "in.jsonl", "--output", "s3://b/out",
                                "--job_id", "j1", "--chunk_size", "8", "--events_prefix", "com.acme",
                                "--model_name", "demo", "--id", "sub-1", "--deadline", "2030-01-01T00:00:00Z"])  # fmt: skip
    assert args.func(args) == 0
    assert "accepted (HTTP 202, no reply event)" in capsys.readouterr().out
    args = parser().parse_args(
        ["batch", "submit", ingress.url, "--input", "in.jsonl", "--output", "/o", "--inline"]
    )
    assert args.func(args) == 0
    generated = capsys.readouterr().err.removeprefix("job_id: ").strip()
    first, second = ingress.events
    assert (first["type"], first["id"], first["subject"], first["model"]) == (
        "com.acme.batch.submitted",
        "sub-1",
        "j1",
        "demo",
    )
    assert first.data == {"job_id": "j1", "input": str(tmp_path / "in.jsonl"), "output": "s3://b/out",
                          "chunk_size": 8, "deadline": "2030-01-01T00:00:00Z"}  # fmt: skip
    # Defaults: the dev.evllm prefix, a new job id, the server's chunk size; --inline sends the lines.
    assert second["type"] == "dev.evllm.batch.submitted" and generated.startswith("job-")
    assert second.data == {"job_id": generated, "input": lines, "output": "/o"}


def test_status_reads_progress_and_completion(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    lines, good, bad = mixed_lines(6)

    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path) as client:

            class Sink:
                url = "http://sink"
                events: list = []

                async def send(self, events) -> None:
                    self.events.extend(events)

                async def close(self) -> None:
                    return None

            client.handlers.sink = Sink()
            data = {"job_id": "st", "input": [json.loads(x) if x.startswith('{"') else x for x in lines],
                    "output": str(tmp_path / "o"), "chunk_size": 4}  # fmt: skip
            ev = CloudEvent({"type": "dev.evllm.batch.submitted", "source": "/t", "id": "1"}, data)
            headers, body = to_binary(ev)
            await client.post("/events", headers=headers, content=body)
            first = client.handlers.sink.events[0]
            headers, body = to_binary(first)
            await client.post("/events", headers=headers, content=body)
            assert cli.job_status(str(tmp_path / "o"), "st")["state"] == "in_progress"
            for c in client.handlers.sink.events[1:]:
                headers, body = to_binary(c)
                await client.post("/events", headers=headers, content=body)

    asyncio.run(main())
    args = parser().parse_args(["batch", "status", f"file://{tmp_path / 'o'}", "--job_id", "st"])
    assert args.func(args) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "completed" and status["chunks_done"] == status["chunks_total"] == 3
    assert status["request_counts"] == {"total": len(good) + bad, "completed": len(good), "failed": bad}
    args = parser().parse_args(["batch", "status", str(tmp_path / "o"), "--job_id", "other"])
    assert args.func(args) == 1


def test_progress_bar_shows_done_total_failed_rate_and_eta() -> None:
    now = [100.0]
    bar = cli.ProgressBar(clock=lambda: now[0], width=10)
    status = {"state": "in_progress", "request_counts": {"total": 100, "completed": 10, "failed": 0}}
    assert bar.render(status) == "[#---------] 10/100 lines, 0 failed  in_progress"
    now[0] = 110.0
    status["request_counts"] = {"total": 100, "completed": 55, "failed": 5}
    # 50 lines in 10 s: 5 lines/s, 40 to go: 8 s.
    assert bar.render(status) == "[######----] 60/100 lines, 5 failed, 5.0 lines/s, ETA 8s  in_progress"


def follow_job(tmp_path: Path, capsys: pytest.CaptureFixture[str], *, cancel: bool) -> tuple[int, list[str]]:
    """A local job running in the event loop while `follow` watches its storage from a thread."""
    inp = [{"custom_id": f"c{i}", "url": "/v1/completions", "body": {"prompt": f"p{i}"}} for i in range(12)]

    async def main() -> int:
        async with events_client(FakeDataPlane(delay=0.02), tmp_path, batch_max_inflight=2) as client:
            data = {"job_id": "fw", "input": inp, "output": str(tmp_path / "o"), "chunk_size": 3}
            headers, body = to_binary(
                CloudEvent({"type": "dev.evllm.batch.submitted", "source": "/t", "id": "1"}, data)
            )
            await client.post("/events", headers=headers, content=body)
            watcher = asyncio.ensure_future(
                asyncio.to_thread(cli.follow, str(tmp_path / "o"), "fw", interval=0.01)
            )
            if cancel:
                await asyncio.sleep(0.05)
                ev = CloudEvent({"type": "dev.evllm.batch.cancel", "source": "/t", "id": "2"},
                                {"job_id": "fw", "output": str(tmp_path / "o")})  # fmt: skip
                headers, body = to_binary(ev)
                assert (await client.post("/events", headers=headers, content=body)).status_code == 200
            return await watcher

    code = asyncio.run(main())
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.startswith("[")]


def test_follow_shows_progress_until_the_job_completes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = follow_job(tmp_path, capsys, cancel=False)
    assert code == 0
    assert len(lines) >= 2
    assert "] 12/12 lines, 0 failed" in lines[-1] and lines[-1].endswith("completed")
    assert any("lines/s, ETA" in line for line in lines)


def test_follow_exits_non_zero_for_a_cancelled_job(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = follow_job(tmp_path, capsys, cancel=True)
    assert code == 1 and lines[-1].endswith("cancelled")


def test_submit_wait_and_status_follow_flags() -> None:
    args = parser().parse_args(["batch", "submit", "http://x", "--input", "i", "--output", "/o", "--wait",
                                "--interval", "0.5"])  # fmt: skip
    assert args.follow is True and args.interval == 0.5
    args = parser().parse_args(["batch", "status", "/o", "--job_id", "j", "--follow"])
    assert args.follow is True

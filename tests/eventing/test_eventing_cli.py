"""`evllm batch status` on a finished and an unfinished job, and argument wiring (no engine)."""

from __future__ import annotations

import argparse
import asyncio
import json
from pathlib import Path

import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent

from eventing import cli

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
    args = p.parse_args(
        ["batch", "submit", "http://x", "--input", "in.jsonl", "--output", "/o", "--job-id", "j"]
    )
    assert args.func is cli.submit_command and args.job_id == "j"
    args = p.parse_args(["batch", "status", "/o", "--job-id", "j"])
    assert args.func is cli.status_command


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
    args = parser().parse_args(["batch", "status", f"file://{tmp_path / 'o'}", "--job-id", "st"])
    assert args.func(args) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["state"] == "completed" and status["chunks_done"] == status["chunks_total"] == 3
    assert status["request_counts"] == {"total": len(good) + bad, "completed": len(good), "failed": bad}
    args = parser().parse_args(["batch", "status", str(tmp_path / "o"), "--job-id", "other"])
    assert args.func(args) == 1

"""A spot node reclaimed while a batch chunk runs (overlays/spot-batch): SIGTERM with a grace period far
shorter than the chunk. The replica stops admitting work, the grace period runs out, the connection
carrying the chunk is dropped (uvicorn cancels what is left), nothing of the chunk is written; the broker
redelivers the chunk to another replica on the same storage, and the job completes with every line exactly
once.

In-process (tests/inprocess.py: the assembled server with the eventing extension, the real
`GracefulShutdown`, fake engine and uvicorn). A real-server version would need a fourth engine start with a
short --grace_period (the session servers use 25 s and 40 s and the suite allows three starts); the real
SIGTERM path itself is covered by tests/predictors/test_shutdown.py on `restarted`, and a chunk cut by a
dead engine by tests/eventing/test_crash_recovery.py.
"""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path
from typing import Any

import httpx
import pytest
from cloudevents.conversion import to_binary
from cloudevents.http import CloudEvent, from_http

from eventing.extension import Eventing
from predictors.shutdown import GracefulShutdown
from tests import inprocess
from tests.conftest import Broker

from .batchdata import check_outputs, completion_line
from .fakes import openai_through_engine

LINES, CHUNK = 12, 6
GRACE = 0.2  # seconds; a chunk below takes ~1.2 s (24 tokens x 0.05 s, its lines concurrently)


def replica(root: Path) -> Any:
    return inprocess.server(["--storage_roots", str(root)], extensions=[Eventing()], delay=0.05)


async def deliver(client: httpx.AsyncClient, event: CloudEvent) -> tuple[int, CloudEvent | None]:
    headers, body = to_binary(event)
    resp = await client.post("/events", headers=headers, content=body)
    reply = from_http(dict(resp.headers), resp.content) if resp.status_code == 200 else None
    return resp.status_code, reply


class Uvicorn:
    """What uvicorn does once GracefulShutdown hands it the signal: connections still open after its own
    graceful timeout are cut; here, the task carrying the chunk's delivery."""

    def __init__(self) -> None:
        self.in_flight: list[asyncio.Task[Any]] = []
        self.exited = asyncio.Event()

    def handle_exit(self, sig: int, frame: Any) -> None:
        for task in self.in_flight:
            task.cancel()
        self.exited.set()


def test_a_chunk_cut_by_preemption_is_redelivered_and_the_job_completes_once(
    tmp_path: Path, k_sink: Broker
) -> None:
    # The fake engine echoes the prompt, one token per character: 24 tokens (context 64 holds 24 + 24).
    lines = [completion_line(f"line-{i}", "x" * 24, max_tokens=24) for i in range(LINES)]
    out = tmp_path / "out"
    job = out / "spot-job"

    async def main() -> None:
        async with replica(tmp_path) as spot, spot.client() as client:
            openai_through_engine(spot)
            submitted = CloudEvent(
                {"type": "dev.evllm.batch.submitted", "source": "/tests/spot", "id": "s-1"},
                {"job_id": "spot-job", "input": lines, "output": str(out), "chunk_size": CHUNK},
            )
            status, accepted = await deliver(client, submitted)
            assert status == 200 and accepted is not None and accepted.data["chunks_total"] == 2
            chunks = k_sink.chunks("spot-job")
            assert sorted(chunks) == [0, 1]

            # The spot replica takes chunk 0; the node is reclaimed while its lines generate.
            uvicorn = Uvicorn()
            graceful = GracefulShutdown(spot.admission, spot.engine, grace_period=GRACE, drain_seconds=0)
            graceful.install(uvicorn)
            delivery = asyncio.ensure_future(deliver(client, chunks[0]))
            uvicorn.in_flight.append(delivery)

            async def generating() -> None:
                while not spot.engine.fake.requests:
                    await asyncio.sleep(0.01)

            await asyncio.wait_for(generating(), timeout=10)
            uvicorn.handle_exit(signal.SIGTERM, None)
            assert (await client.get("/v2/health/ready")).status_code == 503  # no new work routed here
            status, _ = await deliver(client, chunks[1])
            assert status == 503  # a delivery that arrives now is retried elsewhere
            await asyncio.wait_for(uvicorn.exited.wait(), timeout=5)
            # The broker sees the connection drop, never a 200 or a 400: it will redeliver.
            with pytest.raises(asyncio.CancelledError):
                await delivery
            assert spot.engine.fake.aborted  # the lines in the engine were aborted, not left running
            assert not (job / "parts" / "chunk-000000.jsonl").exists()  # all-or-nothing: nothing written

        # Another replica (a new spot node, or the on-demand pool) on the same storage gets the redeliveries.
        async with replica(tmp_path) as other, other.client() as client:
            openai_through_engine(other)
            replies = [await deliver(client, chunks[i]) for i in (0, 1)]
            assert [status for status, _ in replies] == [200, 200]
            assert [reply["type"] for _, reply in replies if reply is not None] == [
                "dev.evllm.batch.progress",
                "dev.evllm.batch.completed",
            ]
            # A late duplicate of the cut delivery (the broker retried twice) changes nothing.
            status, again = await deliver(client, chunks[0])
            assert status == 200 and again is not None and again["type"] == "dev.evllm.batch.completed"

    asyncio.run(main())
    check_outputs(job, {f"line-{i}" for i in range(LINES)}, 0)
    merged = [json.loads(line) for line in (job / "output.jsonl").read_text().splitlines()]
    assert len(merged) == LINES

"""What each consumed event type does; transport-free (routes.py does the HTTP).

Reply contract (Knative): 200 + event = a reply published back to the broker; 400 = client error, not
retried (goes to the deadLetterSink); 429/503 = retried with backoff.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from cloudevents.http import CloudEvent

from predictors.errors import NotReady, Overloaded

from . import catalog, metrics
from .batch import JobError, JobFiles, Manifest, accept, job_key, parse_job
from .chunk import chunks_done, complete, partial_counts, run_chunk
from .config import EventingConfig
from .dataplane import DataPlaneView
from .events import BadEvent, Event, make_event
from .executor import Executor
from .inference import infer
from .sink import Sink
from .storage import Storage, StorageError, exists

logger = logging.getLogger("evllm.eventing")

LOCAL_CHUNKS_AT_ONCE = 2  # local mode (no K_SINK): chunks of one job that run at once
DEDUP_SIZE = 1024  # recent inference replies kept for redeliveries (same source + id)


@dataclass
class Reply:
    status: int
    event: CloudEvent


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class Handlers:
    def __init__(self, dataplane: DataPlaneView, config: EventingConfig, *, sink: Sink | None = None):
        self.dataplane = dataplane
        self.config = config
        self.storage = Storage(config.roots)
        self.executor = Executor(dataplane, low=config.batch_online_inflight, high=config.batch_max_inflight)
        self.sink = sink if sink is not None else (Sink(config.sink) if config.sink else None)
        self.source = f"/evllm/models/{dataplane.model_name}"
        self._replies: collections.OrderedDict[tuple[str, str], asyncio.Future[CloudEvent]] = (
            collections.OrderedDict()
        )
        self._local_jobs: dict[str, asyncio.Task[None]] = {}

    # Dispatch --------------------------------------------------------------------------------------
    async def handle(self, event: Event) -> Reply:
        prefix = self.config.events_prefix + "."
        name = event.type[len(prefix) :] if event.type.startswith(prefix) else None
        if name not in catalog.CONSUMED:
            accepted = ", ".join(self.config.type(n) for n in catalog.CONSUMED)
            raise BadEvent(f"unsupported event type {event.type!r}: this endpoint accepts {accepted}")
        model = event.extensions.get("model")
        served = self.dataplane.model_names()
        if model is not None and model not in served:
            # 400, not 404: Knative retries 404, and retrying cannot make this replica serve that model.
            raise BadEvent(
                f"model {model!r} is not served here (this predictor serves {', '.join(map(repr, served))})"
            )
        if name == "inference.request":
            return Reply(200, await self._dedup(event, self._inference))
        if name == "batch.submitted":
            return await self.submitted(event)
        return await self.chunk(event)

    async def close(self) -> None:
        for task in self._local_jobs.values():
            task.cancel()
        await asyncio.gather(*self._local_jobs.values(), return_exceptions=True)
        await self.executor.close()
        if self.sink is not None:
            await self.sink.close()

    def _event(
        self,
        name: str,
        data: Any,
        *,
        id_: str,
        subject: str | None = None,
        model: str | None = None,
        **ext: Any,
    ) -> CloudEvent:
        return make_event(
            self.config.type(name),
            self.source,
            data,
            id_=id_,
            subject=subject,
            extensions={"model": model or self.dataplane.model_name, **ext},
        )

    # Inference -------------------------------------------------------------------------------------
    async def _dedup(self, event: Event, compute: Callable[[Event], Awaitable[CloudEvent]]) -> CloudEvent:
        """A redelivered event (same source + id) gets the same reply without running the engine again."""
        key = (event.source, event.id)
        fut = self._replies.get(key)
        if fut is not None and not (fut.done() and fut.exception() is not None):
            self._replies.move_to_end(key)
            return await asyncio.shield(fut)
        fut = asyncio.get_running_loop().create_future()
        self._replies[key] = fut
        while len(self._replies) > DEDUP_SIZE:
            self._replies.popitem(last=False)
        try:
            reply = await compute(event)
        except BaseException as exc:
            self._replies.pop(key, None)
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # retrieved: concurrent waiters re-raise it, nobody else needs to
            raise
        fut.set_result(reply)
        return reply

    async def _inference(self, event: Event) -> CloudEvent:
        request_id = f"ce-{_digest(event.source, event.id)}"
        model = event.extensions.get("model")
        data = await infer(self.dataplane, event.data, request_id, model)
        return self._event(
            "inference.response",
            data,
            id_=f"{request_id}-response",
            subject=event.subject,
            model=model,
            requestid=event.id,
            requestsource=event.source,
        )

    # Batch -----------------------------------------------------------------------------------------
    def _failed(self, event: Event, job_id: Any, message: str) -> Reply:
        logger.info("batch job %s failed: %s", job_id, message)
        metrics.job("failed")
        data = {"job_id": job_id if isinstance(job_id, str) else None, "error": message}
        ext = {"jobid": job_id} if isinstance(job_id, str) else {}
        return Reply(
            200,
            self._event(
                "batch.failed",
                data,
                id_=f"batch-failed-{_digest(event.source, event.id)}",
                subject=event.subject,
                **ext,
            ),
        )

    def _progress(self, manifest: Manifest, files: JobFiles, id_: str) -> CloudEvent:
        data = {
            "job_id": manifest.job_id,
            "output": manifest.output,
            "chunks_done": chunks_done(files, manifest),
            "chunks_total": manifest.chunks,
            "request_counts": partial_counts(files, manifest),
        }
        return self._event("batch.progress", data, id_=id_, subject=manifest.job_id, jobid=manifest.job_id)

    def _completed(self, manifest: Manifest, completion: Any) -> CloudEvent:
        return self._event(
            "batch.completed",
            completion.data(),
            id_=completion.event_id,
            subject=manifest.job_id,
            jobid=manifest.job_id,
        )

    async def submitted(self, event: Event) -> Reply:
        data = event.data
        job_id = data.get("job_id") if isinstance(data, dict) else None
        try:
            req = parse_job(data, self.config.batch_chunk_size)
            manifest, files, _ = await asyncio.to_thread(
                accept, self.storage, req, self.config.max_batch_lines
            )
        except JobError as exc:
            return self._failed(event, job_id, exc.message)
        key = job_key(manifest.output, manifest.job_id)
        # Finished (or every part written and only the merge missing, e.g. a crash during it): complete.
        done = await asyncio.to_thread(complete, files, manifest)
        if done is not None:
            return Reply(200, self._completed(manifest, done))
        if self.sink is not None:
            todo = [i for i in range(manifest.chunks) if not await asyncio.to_thread(_exists_part, files, i)]
            await self.sink.send(self._chunk_event(manifest, i) for i in todo)
        elif key not in self._local_jobs:
            task = asyncio.ensure_future(self._run_local(files, manifest))
            self._local_jobs[key] = task
            task.add_done_callback(lambda _: self._local_jobs.pop(key, None))
        progress = await asyncio.to_thread(self._progress, manifest, files, f"batch-{key}-accepted")
        return Reply(200, progress)

    def _chunk_event(self, manifest: Manifest, index: int) -> CloudEvent:
        key = job_key(manifest.output, manifest.job_id)
        data = {
            "job_id": manifest.job_id,
            "output": manifest.output,
            "chunk": index,
            "chunks": manifest.chunks,
        }
        return self._event(
            "batch.chunk",
            data,
            id_=f"batch-{key}-chunk-{index}",
            subject=manifest.job_id,
            jobid=manifest.job_id,
        )

    async def _run_local(self, files: JobFiles, manifest: Manifest) -> None:
        """No K_SINK: run the chunks here, each still an exactly-once unit. Two at a time, so the next
        chunk fills the engine while the last lines of the previous one finish (one at a time, every
        chunk ended with the engine draining); the executor's budget bounds the lines in flight."""
        todo = iter(range(manifest.chunks))
        failed = False

        async def worker() -> None:
            nonlocal failed
            for index in todo:  # shared by the workers: each chunk is taken once
                if failed or not await self._run_local_chunk(files, manifest, index):
                    failed = True
                    return

        await asyncio.gather(*(worker() for _ in range(min(LOCAL_CHUNKS_AT_ONCE, manifest.chunks))))
        if failed:
            return
        completion = await asyncio.to_thread(complete, files, manifest)
        if completion is not None:
            logger.info("job %s completed: %s", manifest.job_id, completion.request_counts)

    async def _run_local_chunk(self, files: JobFiles, manifest: Manifest, index: int) -> bool:
        """Run one chunk, retrying while the engine is away; False when it failed for good."""
        delay = 1.0
        while True:
            try:
                await run_chunk(self.executor, files, manifest, index)
                return True
            except (NotReady, Overloaded) as exc:
                logger.warning("job %s chunk %d: %s; retrying in %.0fs", manifest.job_id, index, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            except Exception:
                logger.exception(
                    "job %s chunk %d failed; redeliver batch.submitted to resume", manifest.job_id, index
                )
                return False

    async def chunk(self, event: Event) -> Reply:
        catalog.check("batch.chunk", event.data, BadEvent)
        data = event.data
        try:
            out = self.storage.resolve(data["output"], write=True)
        except StorageError as exc:
            raise BadEvent(f"batch.chunk output: {exc.message}") from None
        files = JobFiles(out, data["job_id"])
        manifest = await asyncio.to_thread(files.load_manifest)
        if manifest is None:
            raise BadEvent(f"batch.chunk for unknown job {data['job_id']!r} in {out.uri}")
        if data["chunk"] >= manifest.chunks:
            raise BadEvent(f"batch.chunk {data['chunk']} out of range: the job has {manifest.chunks} chunks")
        await run_chunk(self.executor, files, manifest, data["chunk"])
        # Also after a skipped chunk: a crash after the last part file must still complete the job.
        completion = await asyncio.to_thread(complete, files, manifest)
        if completion is not None:
            return Reply(200, self._completed(manifest, completion))
        key = job_key(manifest.output, manifest.job_id)
        progress = await asyncio.to_thread(
            self._progress, manifest, files, f"batch-{key}-chunk-{data['chunk']}-done"
        )
        return Reply(200, progress)


def _exists_part(files: JobFiles, index: int) -> bool:
    return exists(files.part(index))

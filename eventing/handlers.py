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
from dataclasses import dataclass, replace
from typing import Any

from cloudevents.http import CloudEvent

from predictors.errors import NotReady, Overloaded
from predictors.settings import SettingsError

from . import catalog, metrics, storage_events
from .batch import JobError, JobFiles, Manifest, accept, job_key, parse_job, parse_line, split_lines
from .batches import ENDPOINTS, batch_id_of, batch_object, job_files, new_record
from .batchstore import BatchStore
from .cancel import Cancellations, CancelToken, write_marker
from .chunk import Completion, Progress, complete, job_counts, read_result, run_chunk
from .config import EventingConfig
from .dataplane import DataPlaneView
from .events import BadEvent, Event, make_event
from .executor import CANCELLED, Executor
from .inference import infer
from .sink import Sink
from .storage import Retry, Storage, StorageError, StorageUnavailable, exists, read_bytes

logger = logging.getLogger("evllm.eventing")

LOCAL_CHUNKS_AT_ONCE = 2  # local mode (no K_SINK): chunks of one job that run at once
DEDUP_SIZE = 1024  # recent inference replies kept for redeliveries (same source + id)


@dataclass
class Reply:
    status: int
    event: CloudEvent | None  # None: accepted, nothing to publish (an ignored storage event)


def _digest(*parts: str) -> str:
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


class Handlers:
    def __init__(self, dataplane: DataPlaneView, config: EventingConfig, *, sink: Sink | None = None):
        self.dataplane = dataplane
        self.config = config
        self.storage = Storage(config.roots, retry=Retry(config.storage_retry_seconds))
        self.executor = Executor(dataplane, low=config.batch_online_inflight, high=config.batch_max_inflight)
        self.sink = sink if sink is not None else (Sink(config.sink) if config.sink else None)
        self.source = f"/evllm/models/{dataplane.model_name}"
        self._replies: collections.OrderedDict[tuple[str, str], asyncio.Future[CloudEvent]] = (
            collections.OrderedDict()
        )
        self._local_jobs: dict[str, asyncio.Task[None]] = {}
        self._background: set[asyncio.Task[None]] = set()
        self.cancellations = Cancellations()
        self.store: BatchStore | None = None
        try:
            self.store = BatchStore(self.storage.resolve(config.store_uri, write=True))
        except (StorageError, SettingsError) as exc:
            logger.warning("no batch store, /openai/v1/files and /batches answer 503: %s", exc)

    # Dispatch --------------------------------------------------------------------------------------
    async def handle(self, event: Event) -> Reply:
        if storage_events.is_storage_event(event.type):
            return await self.stored(event)
        prefix = self.config.events_prefix + "."
        name = event.type[len(prefix) :] if event.type.startswith(prefix) else None
        if name not in catalog.CONSUMED:
            accepted = ", ".join([*(self.config.type(n) for n in catalog.CONSUMED), *storage_events.TYPES])
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
        if name == "batch.cancel":
            return await self.cancel_event(event)
        return await self.chunk(event)

    def background(self, work: Awaitable[None]) -> None:
        """Run ``work`` beside the server (cancelled at shutdown)."""
        task = asyncio.ensure_future(work)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        for task in [*self._background, *self._local_jobs.values()]:
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        for task in self._local_jobs.values():
            task.cancel()
        await asyncio.gather(*self._local_jobs.values(), return_exceptions=True)
        await self.cancellations.close()
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

    def _batch(self, manifest: Manifest, progress: Progress | None = None) -> dict[str, Any]:
        """The job's OpenAI batch object (blocking), or {} when the batch store does not know it."""
        if self.store is None:
            return {}
        record = self.store.batch(batch_id_of(manifest))
        if record is None:
            return {}
        return batch_object(self.store, self.storage, record, progress)

    def progress_event(self, manifest: Manifest, files: JobFiles, id_: str) -> CloudEvent:
        """batch.progress: the OpenAI batch object plus the job's chunk counts (blocking)."""
        progress = job_counts(files, manifest)
        data = {
            **self._batch(manifest, progress),
            "job_id": manifest.job_id,
            "output": manifest.output,
            "chunks_done": progress.chunks_done,
            "chunks_total": manifest.chunks,
            "request_counts": progress.request_counts,
        }
        return self._event("batch.progress", data, id_=id_, subject=manifest.job_id, jobid=manifest.job_id)

    def _completed(self, manifest: Manifest, completion: Completion) -> CloudEvent:
        """batch.completed, or batch.cancelled for a cancelled job (blocking)."""
        if self.store is not None:
            self.store.set_active(batch_id_of(manifest), False)
        data = {**self._batch(manifest), **completion.data()}
        name = "batch.cancelled" if completion.status == CANCELLED else "batch.completed"
        return self._event(
            name, data, id_=completion.event_id, subject=manifest.job_id, jobid=manifest.job_id
        )

    async def announce(self, event: CloudEvent) -> None:
        """Push a state change nobody's delivery replies with (HTTP create, cancel) to K_SINK. Best effort:
        the state is in storage either way."""
        if self.sink is None:
            return
        try:
            await self.sink.send([event])
        except NotReady as exc:
            logger.warning("cannot announce %s: %s", event["type"], exc.message)

    def _register(self, manifest: Manifest, files: JobFiles, endpoint: str | None = None) -> None:
        """Make a batch.submitted job an OpenAI batch too (GET /openai/v1/batches/{id}); blocking."""
        if self.store is None:
            return
        bid = batch_id_of(manifest)
        if self.store.batch(bid) is not None:
            return
        try:
            lines = split_lines(read_bytes(files.input), files.input.uri)
            first = parse_line(0, lines[0])
            endpoint = endpoint or first.url or ENDPOINTS[0]
            input_id = "file-" + job_key(manifest.output, manifest.job_id) + "-input"
            if self.store.file(input_id) is None:
                size = len("\n".join(lines)) + 1
                self.store.add_file(f"{manifest.job_id}.jsonl", "batch", location=files.input, size=size,
                                    file_id=input_id)  # fmt: skip
            record = new_record(bid, endpoint=endpoint, input_file_id=input_id,
                                metadata={"job_id": manifest.job_id, "output": manifest.output[:512]},
                                job=files, model=self.dataplane.model_name)  # fmt: skip
            self.store.set_active(bid, True)
            self.store.put_batch(record)
        except (StorageError, OSError) as exc:
            logger.warning("job %s: cannot register it in the batch store: %s", manifest.job_id, exc)

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
        try:
            await asyncio.to_thread(self._register, manifest, files)
            return await self._resume(files, manifest)
        except StorageError as exc:  # permanent (not found, forbidden); StorageUnavailable is a 503
            return self._failed(event, job_id, f"storage: {exc.message}")

    async def _resume(self, files: JobFiles, manifest: Manifest) -> Reply:
        # Finished (or every part written and only the merge missing, e.g. a crash during it): complete.
        done = await asyncio.to_thread(complete, files, manifest)
        if done is not None:
            return Reply(200, await asyncio.to_thread(self._completed, manifest, done))
        await self.start(manifest, files)
        key = job_key(manifest.output, manifest.job_id)
        progress = await asyncio.to_thread(self.progress_event, manifest, files, f"batch-{key}-accepted")
        return Reply(200, progress)

    async def start(self, manifest: Manifest, files: JobFiles) -> None:
        """Run an accepted job: its chunks as events to K_SINK, or here (local mode)."""
        key = job_key(manifest.output, manifest.job_id)
        if self.sink is not None:
            todo = [i for i in range(manifest.chunks) if not await asyncio.to_thread(_exists_part, files, i)]
            await self.sink.send(self._chunk_event(manifest, i) for i in todo)
        elif key not in self._local_jobs:
            task = asyncio.ensure_future(self._run_local(files, manifest))
            self._local_jobs[key] = task
            task.add_done_callback(lambda _: self._local_jobs.pop(key, None))

    async def resume(self) -> None:
        """Local mode: resume every job the batch store lists as unfinished (after a restart)."""
        if self.sink is not None or self.store is None:
            return
        store = self.store
        try:
            ids = await asyncio.to_thread(store.active_ids)
        except (StorageError, OSError) as exc:
            logger.warning("cannot list unfinished batch jobs in %s: %s", store.root.uri, exc)
            return
        for bid in ids:
            try:
                record = await asyncio.to_thread(store.batch, bid)
                if record is None:
                    continue
                files = await asyncio.to_thread(job_files, self.storage, record)
                manifest = await asyncio.to_thread(files.load_manifest)
            except (StorageError, OSError) as exc:
                logger.warning("cannot resume batch %s: %s", bid, exc)
                continue
            if manifest is None:
                continue
            if await asyncio.to_thread(complete, files, manifest) is not None:
                await asyncio.to_thread(store.set_active, bid, False)
                continue
            logger.info("resuming batch %s (job %s)", bid, manifest.job_id)
            await self.start(manifest, files)

    async def stored(self, event: Event) -> Reply:
        """An object-created storage event: the same as a batch.submitted for the new object."""
        job = storage_events.job_for(event, self.config.storage_events_output)
        if job is None:
            return Reply(202, None)
        return await self.submitted(replace(event, data=job))

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
        key = job_key(manifest.output, manifest.job_id)

        async def worker(cancel: CancelToken) -> None:
            nonlocal failed
            for index in todo:  # shared by the workers: each chunk is taken once
                if failed or not await self._run_local_chunk(files, manifest, index, cancel):
                    failed = True
                    return

        async with self.cancellations.watch(key, files.cancel) as cancel:
            workers = min(LOCAL_CHUNKS_AT_ONCE, manifest.chunks)
            await asyncio.gather(*(worker(cancel) for _ in range(workers)))
        if failed:
            return
        delay = 1.0
        while True:
            try:
                completion = await asyncio.to_thread(complete, files, manifest)
                break
            except StorageUnavailable as exc:
                logger.warning("job %s: %s; merging again in %.0fs", manifest.job_id, exc.message, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            except StorageError as exc:
                logger.error("job %s failed: %s", manifest.job_id, exc.message)
                return
        if completion is not None:
            await asyncio.to_thread(self._completed, manifest, completion)
            logger.info("job %s %s: %s", manifest.job_id, completion.status, completion.request_counts)

    async def _run_local_chunk(
        self, files: JobFiles, manifest: Manifest, index: int, cancel: CancelToken
    ) -> bool:
        """Run one chunk, retrying while the engine is away; False when it failed for good."""
        delay = 1.0
        while True:
            try:
                await run_chunk(self.executor, files, manifest, index, cancel)
                return True
            except (NotReady, Overloaded) as exc:  # the engine or the storage (StorageUnavailable) is away
                logger.warning("job %s chunk %d: %s; retrying in %.0fs", manifest.job_id, index, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
            except StorageError as exc:
                logger.error("job %s chunk %d failed: %s", manifest.job_id, index, exc.message)
                return False
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
        try:
            return await self._chunk(files, data, out.uri)
        except StorageError as exc:  # permanent (forbidden, gone); StorageUnavailable is a 503
            return self._failed(event, data["job_id"], f"storage: {exc.message}")

    async def _chunk(self, files: JobFiles, data: dict[str, Any], output: str) -> Reply:
        manifest = await asyncio.to_thread(files.load_manifest)
        if manifest is None:
            raise BadEvent(f"batch.chunk for unknown job {data['job_id']!r} in {output}")
        if data["chunk"] >= manifest.chunks:
            raise BadEvent(f"batch.chunk {data['chunk']} out of range: the job has {manifest.chunks} chunks")
        key = job_key(manifest.output, manifest.job_id)
        async with self.cancellations.watch(key, files.cancel) as cancel:
            await run_chunk(self.executor, files, manifest, data["chunk"], cancel)
        # Also after a skipped chunk: a crash after the last part file must still complete the job.
        completion = await asyncio.to_thread(complete, files, manifest)
        if completion is not None:
            return Reply(200, await asyncio.to_thread(self._completed, manifest, completion))
        progress = await asyncio.to_thread(
            self.progress_event, manifest, files, f"batch-{key}-chunk-{data['chunk']}-done"
        )
        return Reply(200, progress)

    # Cancel ----------------------------------------------------------------------------------------
    async def cancel_job(self, manifest: Manifest, files: JobFiles) -> CloudEvent:
        """Cancel a job (idempotent): the marker in storage, this replica's chunks at once; a finished
        job is left as it is. Returns the state-change event (pushed to K_SINK by the caller's choice)."""
        key = job_key(manifest.output, manifest.job_id)
        done = await asyncio.to_thread(read_result, files)
        if done is not None:
            return await asyncio.to_thread(self._completed, manifest, done)
        at = await asyncio.to_thread(write_marker, files.cancel)
        self.cancellations.fire(key, at)
        logger.info("batch job %s: cancel requested", manifest.job_id)
        # Local mode: make sure the job runs somewhere, so its remaining chunks end as cancelled.
        if self.sink is None:
            await self.start(manifest, files)
        return await asyncio.to_thread(self.progress_event, manifest, files, f"batch-{key}-cancelling")

    async def cancel_event(self, event: Event) -> Reply:
        catalog.check("batch.cancel", event.data, BadEvent)
        data = event.data
        try:
            if "batch_id" in data:
                if self.store is None:
                    raise BadEvent("batch.cancel by batch_id needs the batch store (--batch_store)")
                record = await asyncio.to_thread(self.store.batch, data["batch_id"])
                if record is None:
                    raise BadEvent(f"batch.cancel: no batch {data['batch_id']!r}")
                files = await asyncio.to_thread(job_files, self.storage, record)
            else:
                files = JobFiles(self.storage.resolve(data["output"], write=True), data["job_id"])
        except StorageError as exc:
            raise BadEvent(f"batch.cancel: {exc.message}") from None
        manifest = await asyncio.to_thread(files.load_manifest)
        if manifest is None:
            raise BadEvent(f"batch.cancel for unknown job {files.root.uri}")
        return Reply(200, await self.cancel_job(manifest, files))


def _exists_part(files: JobFiles, index: int) -> bool:
    return exists(files.part(index))

"""Jobs from storage events: an object-created CloudEvent from a bucket notification starts a batch job
whose input is the new object (an OpenAI batch JSONL file) and whose output goes under
``--storage_events_output`` (``{bucket}`` there is the event's bucket).

Accepted, as the event sources emit them (examples in tests/eventing/storage_events/):

* ``com.amazonaws.s3.ObjectCreated:*`` -- the CloudEvents AWS S3 adapter (type = ``com.amazonaws.s3.``
  + eventName; S3-compatible stores such as MinIO name it ``s3:ObjectCreated:*``); data is the S3
  event record or a notification ``{"Records": [record]}``;
* ``com.amazon.s3.objectcreated`` -- TriggerMesh's AWSS3Source (data: one S3 event record);
* ``dev.knative.kafka.event`` -- a Knative KafkaSource on the topic MinIO (or S3 via a bridge) publishes
  bucket notifications to (data: the notification);
* ``google.cloud.storage.object.v1.finalized`` -- GCS through Eventarc or a Knative GCS source (data:
  StorageObjectData).

The job id is derived from the object and its version (etag, generation, sequencer): a redelivered
notification resumes the same job, a new upload of the same name is a new job.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote_plus

from .events import BadEvent, Event

S3_ADAPTER_PREFIX = "com.amazonaws.s3."
TRIGGERMESH_S3 = "com.amazon.s3.objectcreated"
KAFKA_SOURCE = "dev.knative.kafka.event"
GCS_FINALIZED = "google.cloud.storage.object.v1.finalized"
TYPES = (f"{S3_ADAPTER_PREFIX}ObjectCreated:*", TRIGGERMESH_S3, KAFKA_SOURCE, GCS_FINALIZED)
_JOB_ID_CHARS = re.compile(r"[^A-Za-z0-9._-]+")


def is_storage_event(type_: str) -> bool:
    return type_.startswith(S3_ADAPTER_PREFIX) or type_ in (TRIGGERMESH_S3, KAFKA_SOURCE, GCS_FINALIZED)


@dataclass(frozen=True)
class StoredObject:
    """The object an event announces: ``s3://bucket/key`` or ``gs://bucket/name``."""

    scheme: str
    bucket: str
    key: str
    version: str  # whatever identifies this upload: versionId, eTag, sequencer, generation

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.bucket}/{self.key}"


def created_object(event: Event) -> StoredObject:
    """The created object of a storage event, or BadEvent saying what is wrong with the payload."""
    data = event.data
    if isinstance(data, (bytes, str)):
        # A KafkaSource may pass the record's value on as application/octet-stream: JSON all the same.
        with contextlib.suppress(ValueError):
            data = json.loads(data)
    if not isinstance(data, dict):
        raise BadEvent(f"{event.type} event data must be a JSON object, got {type(data).__name__}")
    if event.type == GCS_FINALIZED:
        return _gcs(data)
    if event.type.startswith(S3_ADAPTER_PREFIX):
        name = event.type[len(S3_ADAPTER_PREFIX) :]
        if not _created(name):
            raise BadEvent(f"{event.type} is not an object-created event: only ObjectCreated:* start jobs")
    return _s3(data, event.type)


def _created(event_name: Any) -> bool:
    return isinstance(event_name, str) and event_name.removeprefix("s3:").startswith("ObjectCreated:")


def _s3(data: dict[str, Any], type_: str) -> StoredObject:
    records = data.get("Records")
    if records is None and "s3" in data:
        records = [data]  # a single record (TriggerMesh, the CloudEvents adapter)
    if not isinstance(records, list) or not records:
        raise BadEvent(f"{type_} event data is not an S3 event notification (no Records, no s3 record)")
    if len(records) != 1:
        raise BadEvent(f"{type_} event carries {len(records)} records: one object per event, please")
    record = records[0]
    if not isinstance(record, dict) or not _created(record.get("eventName")):
        name = record.get("eventName") if isinstance(record, dict) else None
        raise BadEvent(f"{type_} record is not an object-created event (eventName {name!r})")
    s3 = record.get("s3")
    bucket = _get(s3, "bucket", "name")
    key = _get(s3, "object", "key")
    if not isinstance(bucket, str) or not bucket or not isinstance(key, str) or not key:
        raise BadEvent(f"{type_} record must name s3.bucket.name and s3.object.key")
    obj = _get(s3, "object")
    version = obj.get("versionId") or obj.get("eTag") or obj.get("sequencer") or ""
    # Keys in S3 notifications are URL-encoded (form encoding: a space is '+').
    return StoredObject("s3", bucket, unquote_plus(key), str(version))


def _gcs(data: dict[str, Any]) -> StoredObject:
    bucket, name = data.get("bucket"), data.get("name")
    if not isinstance(bucket, str) or not bucket or not isinstance(name, str) or not name:
        raise BadEvent(f"{GCS_FINALIZED} event data must name the object's bucket and name")
    version = data.get("generation") or data.get("etag") or ""
    return StoredObject("gs", bucket, name, str(version))


def _get(obj: Any, *path: str) -> Any:
    for part in path:
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def job_id(obj: StoredObject) -> str:
    """A valid, stable job id: the file's name (readable) + a digest of the object and its version."""
    digest = hashlib.sha256(f"{obj.uri}\0{obj.version}".encode()).hexdigest()[:12]
    stem = obj.key.rstrip("/").rsplit("/", 1)[-1].removesuffix(".jsonl")
    stem = _JOB_ID_CHARS.sub("-", stem).strip("-._")[:80]
    return f"{stem}-{digest}" if stem else digest


def job_for(event: Event, output_template: str | None) -> dict[str, Any] | None:
    """The batch.submitted data for a storage event; None when the object is not a job input (a folder
    marker, or a file inside the output location: the job's own files would start jobs again)."""
    if not output_template:
        raise BadEvent(
            f"{event.type} events start batch jobs only when --storage_events_output "
            "(EVLLM_STORAGE_EVENTS_OUTPUT) says where their output goes"
        )
    obj = created_object(event)
    if obj.key.endswith("/"):
        return None
    output = output_template.replace("{bucket}", obj.bucket).rstrip("/")
    if obj.uri.startswith(output + "/"):
        return None
    return {"job_id": job_id(obj), "input": obj.uri, "output": output}

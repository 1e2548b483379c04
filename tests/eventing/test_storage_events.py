"""Jobs from storage events: object-created CloudEvents of S3, MinIO and GCS bucket notifications, as the
event sources emit them (vendored in storage_events/, see SOURCES.md), start batch jobs; bad or
unsupported payloads are 400s naming the problem; the job's own output files start nothing."""

from __future__ import annotations

import asyncio
import copy
import json
import re
import time
from pathlib import Path
from typing import Any

import pytest
from cloudevents.http import CloudEvent, from_http

from eventing import catalog, storage_events
from eventing.events import BadEvent, parse_http
from eventing.extension import Eventing
from tests import inprocess

from .batchdata import completion_line
from .conftest import BUCKET, S3
from .fakes import FakeDataPlane, events_client
from .s3server import FaultyProxy

EXAMPLES = Path(__file__).resolve().parent / "storage_events"
JOB_ID = re.compile(catalog.schema("batch.submitted")["properties"]["job_id"]["pattern"])
OUTPUT = "s3://{bucket}/evllm-output"


def example(name: str) -> dict[str, Any]:
    obj: dict[str, Any] = json.loads((EXAMPLES / name).read_text())
    return obj


def structured(obj: dict[str, Any]) -> tuple[dict[str, str], bytes]:
    return {"content-type": "application/cloudevents+json"}, json.dumps(obj).encode()


@pytest.mark.parametrize(
    ("name", "uri"),
    [
        ("aws-s3-cloudevents-adapter.json", "s3://amzn-s3-demo-bucket/HappyFace.jpg"),
        ("triggermesh-awss3source.json", "s3://amzn-s3-demo-bucket/HappyFace.jpg"),
        ("minio-kafkasource.json", "s3://anze/hello.jpg"),
        ("gcs-object-finalized.json", "gs://some-bucket/folder/Test.cs"),
    ],
)
def test_vendored_source_events_name_their_object(name: str, uri: str) -> None:
    event = parse_http(*structured(example(name)))
    assert storage_events.is_storage_event(event.type)
    obj = storage_events.created_object(event)
    assert obj.uri == uri and obj.version
    job = storage_events.job_for(event, "gs://{bucket}/out" if uri.startswith("gs") else OUTPUT)
    assert job is not None and job["input"] == uri
    assert job["output"] == f"{uri.split('://')[0]}://{obj.bucket}/" + ("out" if uri.startswith("gs") else
                                                                         "evllm-output")  # fmt: skip
    assert JOB_ID.match(job["job_id"]) and catalog.errors("batch.submitted", job) == []


def test_kafka_records_as_octet_stream_are_read_as_json() -> None:
    """Binary mode, the value passed on as bytes (no JSON media type), as a KafkaSource may send it."""
    obj = example("minio-kafkasource.json")
    headers = {f"ce-{k}": v for k, v in obj.items() if k not in ("data", "datacontenttype")}
    headers["content-type"] = "application/octet-stream"
    event = parse_http(headers, json.dumps(obj["data"]).encode())
    assert isinstance(event.data, bytes)
    assert storage_events.created_object(event).uri == "s3://anze/hello.jpg"
    garbage = parse_http(headers, b"\x00\x01 not json")
    with pytest.raises(BadEvent, match="must be a JSON object, got bytes"):
        storage_events.created_object(garbage)


def test_job_ids_follow_the_object_and_its_version() -> None:
    base = example("triggermesh-awss3source.json")
    again = copy.deepcopy(base)
    again["id"] = "redelivered"
    reupload = copy.deepcopy(base)
    reupload["data"]["s3"]["object"]["versionId"] = "another-version"
    spaced = copy.deepcopy(base)
    spaced["data"]["s3"]["object"]["key"] = "in/My+Batch+%281%29.jsonl"  # keys arrive URL-encoded
    ids = [
        storage_events.job_for(parse_http(*structured(o)), OUTPUT) for o in (base, again, reupload, spaced)
    ]
    assert ids[0] == ids[1] and ids[0] != ids[2]  # a redelivery resumes, a new upload is a new job
    assert ids[3] is not None and ids[3]["input"] == "s3://amzn-s3-demo-bucket/in/My Batch (1).jsonl"
    assert ids[3]["job_id"].startswith("My-Batch-1-") and JOB_ID.match(ids[3]["job_id"])


def _bad(mutate: Any, base: str = "triggermesh-awss3source.json") -> dict[str, Any]:
    obj = example(base)
    mutate(obj)
    return obj


BAD = [
    (_bad(lambda o: o.update(type="com.amazonaws.s3.ObjectRemoved:Delete"), "aws-s3-cloudevents-adapter.json"),
     "not an object-created event"),
    (_bad(lambda o: o.update(data=["not", "an", "object"])), "must be a JSON object"),
    (_bad(lambda o: o.update(data={"hello": "world"})), "not an S3 event notification"),
    (_bad(lambda o: o["data"].update(eventName="ObjectRemoved:Delete")), "not an object-created event"),
    (_bad(lambda o: o["data"]["s3"]["object"].pop("key")), "s3.object.key"),
    (_bad(lambda o: o["data"].update(Records=[]), "minio-kafkasource.json"), "not an S3 event notification"),
    (_bad(lambda o: o["data"].update(Records=o["data"]["Records"] * 2), "minio-kafkasource.json"),
     "2 records"),
    (_bad(lambda o: o["data"].pop("name"), "gcs-object-finalized.json"), "bucket and name"),
]  # fmt: skip


@pytest.mark.parametrize(("obj", "fragment"), BAD)
def test_bad_storage_events_are_400_naming_the_problem(tmp_path: Path, obj: dict, fragment: str) -> None:
    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path, storage_events_output=OUTPUT) as client:
            resp = await client.post("/events", headers=structured(obj)[0], content=structured(obj)[1])
            assert resp.status_code == 400 and fragment in resp.json()["error"], resp.text

    asyncio.run(main())


def test_storage_events_need_an_output_location(tmp_path: Path) -> None:
    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path) as client:
            headers, body = structured(example("gcs-object-finalized.json"))
            resp = await client.post("/events", headers=headers, content=body)
            assert resp.status_code == 400
            assert "--storage_events_output" in resp.json()["error"]

    asyncio.run(main())


def test_the_jobs_own_files_and_folder_markers_start_nothing(tmp_path: Path) -> None:
    async def main() -> None:
        async with events_client(FakeDataPlane(), tmp_path, storage_events_output=OUTPUT) as client:
            for key in ("evllm-output/job-1/parts/chunk-000000.jsonl", "incoming/"):
                obj = _bad(lambda o, key=key: o["data"]["s3"]["object"].update(key=key))
                resp = await client.post("/events", headers=structured(obj)[0], content=structured(obj)[1])
                assert resp.status_code == 202 and resp.content == b""

    asyncio.run(main())


def test_an_uploaded_jsonl_file_becomes_a_job(s3: S3, proxy: FaultyProxy, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """End to end on the assembled server (local mode) over moto's S3: the MinIO notification of a new
    file, as a KafkaSource delivers it, starts the job; its redelivery answers with the completion."""
    monkeypatch.delenv("K_SINK", raising=False)
    lines = [completion_line(f"up-{i}", f"uploaded {i}") for i in range(5)]
    s3.fs().pipe_file(
        f"{BUCKET}/incoming/daily batch.jsonl", "".join(json.dumps(x) + "\n" for x in lines).encode()
    )
    obj = example("minio-kafkasource.json")
    record = obj["data"]["Records"][0]
    record["s3"]["bucket"]["name"] = BUCKET
    record["s3"]["object"]["key"] = "incoming/daily+batch.jsonl"
    headers, body = structured(obj)

    async def main() -> tuple[CloudEvent, CloudEvent]:
        argv = ["--storage_roots", str(tmp_path), "--storage_events_output", OUTPUT]
        async with inprocess.server(argv, extensions=[Eventing()]) as s, s.client() as c:
            resp = await c.post("/events", headers=headers, content=body)
            assert resp.status_code == 200, resp.text
            accepted = from_http(dict(resp.headers), resp.content)
            started = time.monotonic()
            while True:
                resp = await c.post("/events", headers=headers, content=body)
                again = from_http(dict(resp.headers), resp.content)
                if again["type"] == "dev.evllm.batch.completed":
                    return accepted, again
                assert time.monotonic() - started < 30, again.data
                await asyncio.sleep(0.1)

    accepted, done = asyncio.run(main())
    assert accepted["type"] == "dev.evllm.batch.progress"
    job_id = accepted.data["job_id"]
    assert job_id.startswith("daily-batch-") and done.data["job_id"] == job_id
    assert accepted.data["output"] == f"s3://{BUCKET}/evllm-output"
    assert done.data["request_counts"] == {"total": 5, "completed": 5, "failed": 0}
    assert done.data["output_file"] == f"s3://{BUCKET}/evllm-output/{job_id}/output.jsonl"
    out = s3.fs().cat_file(f"{BUCKET}/evllm-output/{job_id}/output.jsonl").decode().splitlines()
    assert sorted(json.loads(x)["custom_id"] for x in out) == [f"up-{i}" for i in range(5)]

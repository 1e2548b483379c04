"""`evllm send` and `evllm batch submit|status`: post CloudEvents, inspect and follow batch jobs in storage."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
from cloudevents.http import CloudEvent, from_http

from .config import DEFAULT_PREFIX
from .events import encode, make_event, to_json


def add_parsers(subparsers: Any) -> None:
    send = subparsers.add_parser(
        "send",
        allow_abbrev=False,
        help="post one CloudEvent to URL (broker ingress or a predictor's /events)",
    )
    send.add_argument("url")
    send.add_argument("--type", required=True, help="event type, e.g. dev.evllm.inference.request")
    send.add_argument("--data", required=True, help="event data as JSON (or @FILE)")
    _common(send)
    mode = send.add_mutually_exclusive_group()
    mode.add_argument(
        "--binary", dest="binary", action="store_true", default=True, help="binary mode (default)"
    )
    mode.add_argument("--structured", dest="binary", action="store_false", help="structured mode")
    send.add_argument("--extension", action="append", default=[], metavar="K=V", help="extension attribute")
    send.add_argument("--subject")
    send.set_defaults(func=send_command)

    batch = subparsers.add_parser("batch", help="batch jobs: submit, status", allow_abbrev=False)
    sub = batch.add_subparsers(dest="batch_command", required=True)
    submit = sub.add_parser(
        "submit",
        allow_abbrev=False,
        help="post a <prefix>.batch.submitted event for an OpenAI batch JSONL file",
    )
    submit.add_argument("url")
    submit.add_argument("--input", required=True, help="JSONL file path or URI the server can read")
    submit.add_argument("--output", required=True, help="output directory URI (results in OUTPUT/JOB_ID/)")
    submit.add_argument("--job_id", default=None, help="job id (default: a new random one)")
    submit.add_argument(
        "--chunk_size", type=int, default=None, help="lines per chunk (default: the server's)"
    )
    submit.add_argument("--deadline", default=None, help="RFC 3339 time; lines not started by then fail")
    submit.add_argument("--inline", action="store_true", help="send the file's lines in the event itself")
    submit.add_argument(
        "--events_prefix", default=DEFAULT_PREFIX, help=f"event type prefix (default {DEFAULT_PREFIX})"
    )
    _follow_flags(submit, "--wait", "after submitting, show a live progress bar until the job ends")
    _common(submit)
    submit.set_defaults(func=submit_command)

    status = sub.add_parser(
        "status", help="print a job's progress and counts from its output URI", allow_abbrev=False
    )
    status.add_argument("output", help="the job's output directory URI")
    status.add_argument("--job_id", required=True)
    _follow_flags(status, "--follow", "show a live progress bar until the job ends")
    status.set_defaults(func=status_command)


def _follow_flags(p: argparse.ArgumentParser, flag: str, help: str) -> None:
    p.add_argument(flag, dest="follow", action="store_true",
                   help=help + " (lines done/total, failed, rate, ETA); exit 1 unless it completed")  # fmt: skip
    p.add_argument("--interval", type=float, default=1.0, help="seconds between progress reads (default 1)")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--source", default="/evllm/cli", help="event source (default /evllm/cli)")
    p.add_argument("--id", default=None, help="event id (default: random; reuse it to test redelivery)")
    p.add_argument(
        "--model_name",
        default=None,
        help="the served model's name (evllm serve's --model_name), sent as the `model` extension "
        "attribute that Triggers filter on",
    )
    p.add_argument("--timeout", type=float, default=300.0)


def _post(url: str, event: CloudEvent, *, binary: bool, timeout: float) -> int:
    headers, body = encode(event, binary=binary)
    try:
        resp = httpx.post(url, headers=headers, content=body, timeout=timeout)
    except httpx.HTTPError as exc:
        print(f"error: {url}: {exc}", file=sys.stderr)
        return 1
    if resp.status_code >= 300:
        print(f"error: HTTP {resp.status_code}: {resp.text}", file=sys.stderr)
        return 1
    if resp.content:
        print(json.dumps(to_json(from_http(dict(resp.headers), resp.content)), indent=2))
    else:
        print(f"accepted (HTTP {resp.status_code}, no reply event)")
    return 0


def _extensions(args: argparse.Namespace, pairs: list[str]) -> dict[str, str]:
    ext = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--extension wants K=V, got {pair!r}")
        ext[key] = value
    if args.model_name:
        ext["model"] = args.model_name
    return ext


def send_command(args: argparse.Namespace) -> int:
    raw = Path(args.data[1:]).read_text() if args.data.startswith("@") else args.data
    try:
        data = json.loads(raw)
    except json.JSONDecodeError as exc:
        print(f"error: --data is not JSON: {exc}", file=sys.stderr)
        return 2
    event = make_event(args.type, args.source, data, id_=args.id, subject=args.subject,
                       extensions=_extensions(args, args.extension))  # fmt: skip
    return _post(args.url, event, binary=args.binary, timeout=args.timeout)


def submit_command(args: argparse.Namespace) -> int:
    job_id = args.job_id or f"job-{uuid.uuid4().hex[:12]}"
    data: dict[str, Any] = {"job_id": job_id, "output": args.output}
    if args.inline:
        data["input"] = [line for line in Path(args.input).read_text().splitlines() if line.strip()]
    elif "://" in args.input:
        data["input"] = args.input
    else:
        data["input"] = str(Path(args.input).resolve())  # the server resolves it against its own roots
    if args.chunk_size:
        data["chunk_size"] = args.chunk_size
    if args.deadline:
        data["deadline"] = args.deadline
    event = make_event(f"{args.events_prefix}.batch.submitted", args.source, data, id_=args.id, subject=job_id,
                       extensions=_extensions(args, []))  # fmt: skip
    print(f"job_id: {job_id}", file=sys.stderr)
    code = _post(args.url, event, binary=True, timeout=args.timeout)
    if code != 0 or not args.follow:
        return code
    return follow(args.output, job_id, interval=args.interval)


def job_status(output: str, job_id: str) -> dict[str, Any]:
    """A job's state from its files: no server needed (the CLI reads the output URI directly)."""
    from .batch import JobFiles
    from .cancel import read_marker
    from .chunk import job_counts, read_result
    from .storage import Storage

    out = Storage(["/"]).resolve(output)  # the user's own machine/credentials: no confinement here
    files = JobFiles(out, job_id)
    manifest = files.load_manifest()
    if manifest is None:
        return {"job_id": job_id, "state": "not found", "output": out.uri}
    result = read_result(files)
    progress = job_counts(files, manifest)
    if result is not None:
        state = result.status  # completed | cancelled | expired
    else:
        state = "cancelling" if read_marker(files.cancel) is not None else "in_progress"
    status: dict[str, Any] = {
        "job_id": job_id,
        "state": state,
        "chunks_done": progress.chunks_done,
        "chunks_total": manifest.chunks,
        "request_counts": result.request_counts if result else progress.request_counts,
    }
    if result:
        status.update(output_file=result.output_file, error_file=result.error_file)
    return status


ENDED = ("completed", "cancelled", "expired", "failed")


class ProgressBar:
    """One line: bar, lines done/total, failed, rate and ETA (rate over what this watcher saw)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, width: int = 30):
        self.clock, self.width = clock, width
        self.first: tuple[float, int] | None = None

    def render(self, status: dict[str, Any]) -> str:
        counts = status.get("request_counts") or {}
        total = int(counts.get("total") or 0)
        done = int(counts.get("completed") or 0) + int(counts.get("failed") or 0)
        now = self.clock()
        if self.first is None:
            self.first = (now, done)
        t0, d0 = self.first
        rate = (done - d0) / (now - t0) if now > t0 and done > d0 else None
        filled = int(self.width * done / total) if total else 0
        bar = "#" * filled + "-" * (self.width - filled)
        text = f"[{bar}] {done}/{total} lines, {counts.get('failed', 0)} failed"
        if rate is not None:
            eta = (total - done) / rate
            text += f", {rate:.1f} lines/s, ETA {_duration(eta)}"
        return f"{text}  {status['state']}"


def _duration(secs: float) -> str:
    seconds = round(secs)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def follow(
    output: str,
    job_id: str,
    *,
    interval: float = 1.0,
    sleep: Callable[[float], None] = time.sleep,
    bar: ProgressBar | None = None,
) -> int:
    """Redraw the job's progress until it ends (a line per update when stderr is not a terminal); print
    the final status as JSON. 0 if it completed, 1 otherwise (failed, cancelled, expired, not found)."""
    from .storage import StorageError

    bar = bar or ProgressBar()
    tty = sys.stderr.isatty()
    last = ""
    while True:
        try:
            status = job_status(output, job_id)
        except StorageError as exc:
            print(f"\nerror: {exc.message}", file=sys.stderr)
            return 1
        line = bar.render(status) if status["state"] != "not found" else f"job {job_id}: not found yet"
        if line != last:
            print(("\r\033[K" if tty else "") + line, end="" if tty else "\n", file=sys.stderr, flush=True)
            last = line
        if status["state"] in ENDED:
            if tty:
                print(file=sys.stderr)
            print(json.dumps(status, indent=2))
            return 0 if status["state"] == "completed" else 1
        sleep(interval)


def status_command(args: argparse.Namespace) -> int:
    from .storage import StorageError, StorageUnavailable

    if args.follow:
        return follow(args.output, args.job_id, interval=args.interval)
    try:
        status = job_status(args.output, args.job_id)
    except (StorageError, StorageUnavailable) as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(status, indent=2))
    return 0 if status["state"] != "not found" else 1

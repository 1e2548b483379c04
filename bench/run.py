"""One benchmark run: sessions of `vllm serve` and `evllm serve` alternated (A B A B), run_batch, jobs.
With `Config.url`, the evllm measurements only, on a server that is already running (no engine started)."""

from __future__ import annotations

import json
import platform
import subprocess
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from predictors.demo_model import ADAPTER_RANK, ensure_demo_adapter, ensure_demo_model

from . import batchjobs, coldstart
from .load import (
    Protocol,
    lora_completions,
    openai_completions,
    run_load,
    v2_generate,
    v2_grpc,
    v2_infer,
    v2_infer_binary,
)
from .servers import ADAPTER, MODEL_NAME, Attached, Server, engine_lock, run_batch, work_dir


@dataclass
class Config:
    repeats: int = 3
    concurrencies: list[int] = field(default_factory=lambda: [1, 16, 64])
    warmup: float = 2.0
    duration: float = 10.0
    batch_big: int = 20000
    batch_small: int = 200
    chunk_size: int | None = 1024
    priority_concurrency: int = 4
    priority_lines: int = 4000
    engine_args: list[str] = field(default_factory=lambda: ["--max-model-len", "1024", "--dtype", "float32"])
    env: dict[str, str] = field(
        default_factory=lambda: {"VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONUNBUFFERED": "1"}
    )
    # evllm serve defaults to priority scheduling (batch runs below online traffic); give vllm serve
    # and run_batch the same policy so every engine runs with identical arguments.
    vllm_policy: str = "priority"
    sections: tuple[str, ...] = ("online", "batch", "run_batch", "priority", "startup", "lora")
    # LoRA: vllm serve and evllm serve both with the demo adapter (the same LoRA flags), OpenAI
    # completions spread over the base model and the adapter, at this concurrency.
    lora_concurrency: int = 16
    lora_pairs: int = 3  # evllm LoRA windows per repeat, each between two vllm serve windows
    # Attach to an `evllm serve` already running at url instead of starting servers (no vllm serve,
    # run_batch or cold start); batch and priority jobs then live in `storage`, which must be inside
    # that server's --storage_roots.
    url: str | None = None
    storage: str | None = None
    grpc: str | None = None  # with url: the attached server's gRPC host:port (V2 infer over gRPC)

    @classmethod
    def smoke(cls) -> Config:
        # No startup section: its five engine starts are most of a full run's (`--sections startup` runs it).
        return cls(repeats=1, concurrencies=[1, 4], warmup=0.5, duration=2.0, batch_big=40, batch_small=0,
                   chunk_size=None, priority_lines=300, priority_concurrency=2, lora_pairs=1,
                   sections=("online", "batch", "run_batch", "priority", "lora"), lora_concurrency=4)  # fmt: skip


def machine() -> dict[str, Any]:
    def sh(*cmd: str) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=10).stdout.strip()
        except OSError:
            return ""

    lscpu = dict(
        line.split(":", 1) for line in sh("lscpu").splitlines() if ":" in line
    )  # "Model name:  AMD EPYC"
    mem_kib = next(
        (int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
         if line.startswith("MemTotal")), 0)  # fmt: skip
    import vllm

    return {
        "nproc": sh("nproc"),
        "cpu": lscpu.get("Model name", "").strip(),
        "mem_gib": round(mem_kib / 2**20, 1),
        "gpu": "none",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "vllm": getattr(vllm, "__version__", "?"),
    }


class Bench:
    def __init__(self, cfg: Config, out: Path):
        self.cfg = cfg
        self.out = out
        self.work = work_dir()
        self.logs = out / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        if cfg.url is None:
            self.model_dir = ensure_demo_model(self.work / "models" / "demo")
            self.storage = self.work / "storage"
        else:  # the attached server reads inputs and writes outputs here (inside its storage roots)
            self.storage = Path(cfg.storage or self.work) / f"bench-{uuid.uuid4().hex[:8]}"
        self.storage.mkdir(parents=True)
        self.seq = 0  # windows measured so far (their order pairs them in the report)
        self.results: dict[str, Any] = {
            "config": asdict(cfg),
            "machine": machine(),
            "online": [],
            "cold_start": [],
            "startup": [],
            "batch": [],
            "priority": [],
            "lora": [],
        }
        # batch_small 0: one size only (no marginal rate), as in the smoke run.
        self.sizes = [n for n in (cfg.batch_small, cfg.batch_big) if n > 0]
        self.files = {n: batchjobs.write_batch_file(self.storage / f"batch-{n}.jsonl", n) for n in self.sizes}

    def engine_args(self, kind: str) -> list[str]:
        args = list(self.cfg.engine_args)
        if kind != "evllm":
            args += ["--scheduling-policy", self.cfg.vllm_policy]
        return args

    def lora_args(self) -> list[str]:
        """The same LoRA flags for both servers: the demo adapter as the model `ADAPTER`."""
        adapter = ensure_demo_adapter(self.model_dir)
        return [
            "--enable-lora",
            "--max-lora-rank",
            str(ADAPTER_RANK),
            "--lora-modules",
            f"{ADAPTER}={adapter}",
        ]

    def lora_sessions(self, rep: int) -> None:
        """Both servers with LoRA on, windows paired (`paired`): throughput over base + adapter traffic at
        `lora_concurrency`, `lora_pairs` evllm windows each between two of vllm serve's."""
        vllm, evllm = (Server(kind, self.model_dir, self.engine_args(kind) + self.lora_args(), self.cfg.env,
                              self.logs, self.storage) for kind in ("vllm", "evllm"))  # fmt: skip
        try:
            for srv in (vllm, evllm):
                srv.start()
                self.log(f"{srv.kind} serve (LoRA) ready in {srv.cold_start:.1f}s")
            base = lora_completions(vllm.openai_prefix, MODEL_NAME, ADAPTER)
            protos = [lora_completions(evllm.openai_prefix, MODEL_NAME, ADAPTER)] * self.cfg.lora_pairs
            self.paired("lora", rep, vllm, base, evllm, protos, self.cfg.lora_concurrency)
        finally:
            evllm.stop()
            vllm.stop()
        self.save()

    def save(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.results, indent=1))

    def log(self, msg: str) -> None:
        print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)

    # Sessions ---------------------------------------------------------------------------------------
    def server(self, kind: str) -> Server:
        return Server(kind, self.model_dir, self.engine_args(kind), self.cfg.env, self.logs, self.storage)

    def protocols(self, srv: Server | Attached) -> list[Protocol]:
        protos = [openai_completions(srv.openai_prefix, MODEL_NAME)]
        if srv.kind == "evllm":
            protos += [v2_infer(MODEL_NAME), v2_infer_binary(MODEL_NAME), v2_generate(MODEL_NAME)]
            if srv.grpc_target is not None:
                protos.append(v2_grpc(MODEL_NAME))
        return protos

    def window(self, section: str, rep: int, srv: Server | Attached, proto: Protocol, c: int) -> None:
        """One measured window; `window` numbers them in order, so the report can pair each evllm window
        with the vllm serve windows on either side of it."""
        target = srv.grpc_target if proto.grpc and srv.grpc_target else srv.url
        res = run_load(target, proto, c, self.cfg.warmup, self.cfg.duration)
        self.seq += 1
        self.results[section].append({"repeat": rep, "window": self.seq, "server": srv.kind, **res.to_dict()})

    def online(self, rep: int, srv: Server | Attached) -> None:
        """One server alone (attached mode): every protocol at every concurrency."""
        for c in self.cfg.concurrencies:
            for proto in self.protocols(srv):
                self.window("online", rep, srv, proto, c)

    def paired(
        self,
        section: str,
        rep: int,
        vllm: Server,
        base: Protocol,
        evllm: Server,
        protos: list[Protocol],
        c: int,
    ) -> None:
        """vllm serve and evllm both up, one loaded at a time (the idle one takes ~1% of a core): each
        evllm window of `protos` sits between two vllm serve windows of `base` (A B A C A ...), so a ratio
        compares windows seconds apart rather than sessions minutes apart (the machine drifts by +-30% over
        minutes)."""
        self.window(section, rep, vllm, base, c)
        for proto in protos:
            self.window(section, rep, evllm, proto, c)
            self.window(section, rep, vllm, base, c)

    def sessions(self, rep: int) -> None:
        """vllm serve and evllm serve started one after the other (cold starts; which one goes first
        alternates between repeats, so the second start beside an idle server is no one's bias), the online
        windows paired, then vllm serve stopped and evllm's batch and priority work measured alone."""
        sections = set(self.cfg.sections)
        vllm, evllm = self.server("vllm"), self.server("evllm")
        order = [evllm] if "online" not in sections else [vllm, evllm] if rep % 2 == 0 else [evllm, vllm]
        try:
            for srv in order:
                srv.start()
                self.log(f"{srv.kind} serve ready in {srv.cold_start:.1f}s")
                self.results["cold_start"].append(
                    {"repeat": rep, "server": srv.kind, "seconds": srv.cold_start}
                )
            if "online" in sections:
                base, protos = openai_completions(vllm.openai_prefix, MODEL_NAME), self.protocols(evllm)
                for c in self.cfg.concurrencies:
                    self.paired("online", rep, vllm, base, evllm, protos, c)
                self.save()
            vllm.stop()
            self.evllm_work(rep, evllm)
        finally:
            evllm.stop()
            vllm.stop()
        self.save()

    def run_batch(self, rep: int) -> None:
        for n in self.sizes:
            out = self.work / f"run_batch-{rep}-{n}.jsonl"
            secs = run_batch(self.model_dir, self.engine_args("run_batch"), self.cfg.env, self.files[n], out,
                             self.logs)  # fmt: skip
            ok, tokens = batchjobs.count_output(out)
            self.log(f"run_batch {n} lines: {secs:.1f}s ({ok} ok, {tokens} tokens)")
            self.results["batch"].append({"repeat": rep, "runner": "run_batch", "lines": n, "seconds": secs,
                                          "ok": ok, "tokens": tokens})  # fmt: skip
            self.save()

    def evllm_work(self, rep: int, srv: Server | Attached) -> None:
        """Everything measured on evllm: online protocols, batch jobs, online latency under a job."""
        if "online" in self.cfg.sections and isinstance(srv, Attached):
            self.online(rep, srv)
            self.save()
        if "batch" in self.cfg.sections:
            for n in self.sizes:
                secs, output = batchjobs.run_job(srv.url, self.files[n], self.storage / "jobs",
                                                 self.cfg.chunk_size)  # fmt: skip
                ok, tokens = batchjobs.count_output(output)
                self.log(f"evllm job {n} lines: {secs:.1f}s ({ok} ok, {tokens} tokens)")
                self.results["batch"].append({"repeat": rep, "runner": "evllm", "lines": n,
                                              "seconds": secs, "ok": ok, "tokens": tokens,
                                              "cold_start": srv.cold_start})  # fmt: skip
                # The same lines through the OpenAI Batch API (upload, create, poll) on the same server.
                secs, output = batchjobs.run_http_job(
                    srv.url, self.files[n], self.work / f"http-{rep}-{n}.jsonl"
                )
                ok, tokens = batchjobs.count_output(output)
                self.log(f"evllm OpenAI Batch API {n} lines: {secs:.1f}s ({ok} ok, {tokens} tokens)")
                self.results["batch"].append({"repeat": rep, "runner": "evllm-http", "lines": n,
                                              "seconds": secs, "ok": ok, "tokens": tokens})  # fmt: skip
            self.save()
        if "priority" in self.cfg.sections:
            self.priority(rep, srv)
            self.save()

    def priority(self, rep: int, srv: Server | Attached) -> None:
        """Online p95 at low concurrency with no batch, then while a batch job runs."""
        cfg = self.cfg
        proto = openai_completions(srv.openai_prefix, MODEL_NAME)
        idle = run_load(srv.url, proto, cfg.priority_concurrency, cfg.warmup, cfg.duration)
        self.results["priority"].append({"repeat": rep, "state": "idle", **idle.to_dict()})
        inp = batchjobs.write_batch_file(self.storage / f"priority-{rep}.jsonl", cfg.priority_lines)
        out = self.storage / "jobs"
        job_id = f"prio-{rep}-{int(time.time())}"
        t0 = time.perf_counter()
        batchjobs.submit(srv.url, inp, out, job_id, cfg.chunk_size)
        time.sleep(1.0)  # the job is at full speed when online traffic arrives
        busy = run_load(srv.url, proto, cfg.priority_concurrency, cfg.warmup, cfg.duration)
        t_load = time.perf_counter() - t0
        still_running = not (out / job_id / "result.json").exists()
        result = batchjobs.wait_done(out, job_id)
        t_job = time.perf_counter() - t0
        self.log(f"priority: job of {cfg.priority_lines} lines took {t_job:.1f}s, "
                 f"{'still running' if still_running else 'FINISHED'} when the online load ended")  # fmt: skip
        self.results["priority"].append({"repeat": rep, "state": "batch", **busy.to_dict(),
                                         "batch_running_throughout": still_running, "job_seconds": t_job,
                                         "load_seconds": t_load,
                                         "job_counts": result.get("request_counts")})  # fmt: skip

    def run(self) -> dict[str, Any]:
        if self.cfg.url is not None:
            return self.run_attached(self.cfg.url)
        for rep in range(self.cfg.repeats):
            # One lock for the whole repeat: the A and B sessions stay back to back (another test
            # session's engines may run between repeats, never between the two sides of a comparison).
            with engine_lock():
                self.log(f"repeat {rep + 1}/{self.cfg.repeats}")
                if {"online", "batch", "priority"} & set(self.cfg.sections):
                    self.sessions(rep)
                if "run_batch" in self.cfg.sections:
                    self.run_batch(rep)
                if "lora" in self.cfg.sections:
                    self.lora_sessions(rep)
                if "startup" in self.cfg.sections:
                    self.results["startup"] += coldstart.measure(self, rep)
                    self.save()
        self.save()
        return self.results

    def run_attached(self, url: str) -> dict[str, Any]:
        """No engine started (so no engine lock): the running server's evllm measurements only."""
        srv = Attached(url, grpc_target=self.cfg.grpc).check()
        self.results["attached"] = url
        for rep in range(self.cfg.repeats):
            self.log(f"repeat {rep + 1}/{self.cfg.repeats} on {url}")
            self.evllm_work(rep, srv)
        self.save()
        return self.results

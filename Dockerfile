# syntax=docker/dockerfile:1
#
# Two images from one file:
#   docker build --target operator -t ghcr.io/g2rpo/g2rpo-operator:0.1.0 .   # operator + guidance controller
#   docker build --target trainer  -t ghcr.io/g2rpo/g2rpo-trainer:0.1.0 .    # DeepSpeed trainer + vLLM server
# The operator image never installs torch (the `operator` and `controller` extras do not pull it);
# the trainer image runs `accelerate launch -m g2rpo.train` and `trl vllm-serve`. Both run as uid 1000,
# the uid the operator's pods ask for (runAsUser), so files on the checkpoint claim stay writable.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-cudnn-devel-ubuntu24.04

# --- the operator / controller image -------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS operator
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
WORKDIR /opt/g2rpo
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY operator/ operator/
RUN pip install ".[operator,controller]" \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)" \
    && useradd --uid 1000 --user-group --no-create-home --shell /usr/sbin/nologin g2rpo
USER 1000:1000
EXPOSE 8080 8081 9090
CMD ["python", "-m", "g2rpo_operator"]

# --- the trainer / rollout image -----------------------------------------------------------------
# A CUDA *devel* base: DeepSpeed compiles its ops just in time with nvcc.
FROM ${CUDA_IMAGE} AS trainer
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv python3-dev build-essential git ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && python3 -m venv /opt/venv
WORKDIR /opt/g2rpo
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY operator/ operator/
# One resolution for torch and the extras: vLLM pins the torch it was built against, so pip picks
# that CUDA build of torch from PyPI instead of a second, conflicting one.
RUN pip install torch ".[train,deepspeed,vllm]" \
    && (userdel --remove ubuntu 2>/dev/null || true) \
    && useradd --uid 1000 --user-group --create-home --shell /bin/bash g2rpo
USER 1000:1000
ENV HOME=/home/g2rpo
CMD ["python", "-m", "g2rpo.train", "--help"]

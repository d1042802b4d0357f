# syntax=docker/dockerfile:1
#
# Two images from one file (the names and tags are the operator's defaults, and the chart's):
#   docker build --target operator -t ghcr.io/g2rpo/g2rpo-operator:0.1.0 .   # operator + guidance controller
#   docker build --target trainer  -t ghcr.io/g2rpo/g2rpo-trainer:0.1.0 .    # DeepSpeed trainer + vLLM server
#
# Dependencies come only from the committed locks (constraints/*.txt, `make lock`), installed in
# stages that copy nothing but the lock, so a code change rebuilds only the small project-wheel
# layers and never reinstalls torch or vLLM. Both images run as uid 1000, the uid the operator's pods
# ask for (runAsUser), so files on the checkpoint claim stay writable.
#
# The base is pinned by exact tag and digest. The digest is the one several public projects pin
# for this tag; it was not read from the registry (no Docker engine or registry was reachable when
# it was written): check it once with `docker buildx imagetools inspect python:3.12.12-slim-bookworm`.
# The locks are resolved for this interpreter and C library (CPython 3.12, glibc 2.36).

# --- shared base: interpreter, environment, the unprivileged user ---------------------------------
FROM python:3.12.12-slim-bookworm@sha256:593bd06efe90efa80dc4eee3948be7c0fde4134606dd40d8dd8dbcade98e669c AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN useradd --uid 1000 --user-group --create-home --shell /usr/sbin/nologin g2rpo

# --- the project as a wheel: the only stage that sees the source -----------------------------------
FROM base AS project
WORKDIR /src
COPY pyproject.toml README.md ./
COPY trainer/ trainer/
COPY operator/ operator/
RUN pip wheel --no-deps --wheel-dir /wheels .

# --- operator dependencies (builder) ----------------------------------------------------------------
FROM base AS operator-deps
COPY constraints/operator.txt /tmp/constraints/
# The lock is complete (tests/test_lock.py replays its resolution), so nothing is resolved here;
# `pip check` still proves the installed set is consistent.
RUN python -m venv /opt/venv \
    && pip install --no-deps -r /tmp/constraints/operator.txt \
    && pip check

# --- the operator / controller image -----------------------------------------------------------------
FROM base AS operator
COPY --from=operator-deps /opt/venv /opt/venv
COPY --from=project /wheels/ /tmp/wheels/
# The operator image never holds torch: its extras do not pull it, and this fails the build if one does.
RUN pip install --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels \
    && python -c "import importlib.util, sys; sys.exit(importlib.util.find_spec('torch') is not None)"
USER 1000:1000
WORKDIR /home/g2rpo
EXPOSE 8080 8081 9090
#checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; the operator's pods declare liveness/readiness probes on /healthz.
CMD ["python", "-m", "g2rpo_operator"]

# --- trainer dependencies (builder) -----------------------------------------------------------------
FROM base AS trainer-deps
COPY constraints/trainer-cuda.txt /tmp/constraints/
# DeepSpeed ships only an sdist; DS_BUILD_OPS=0 builds it as pure Python (its CUDA ops are
# compiled just in time when a config asks for one, see the trainer stage). Every other package is a
# wheel for cp312/manylinux (tests/test_lock.py fails if that changes), so no compiler is needed here.
RUN python -m venv /opt/venv \
    && DS_BUILD_OPS=0 pip install --no-deps -r /tmp/constraints/trainer-cuda.txt \
    && pip check

# --- the trainer / rollout image ----------------------------------------------------------------------
# CUDA comes from the locked nvidia-* wheels (torch's and vLLM's runtime libraries), and the driver
# from the node (NVIDIA container runtime), so the base needs no CUDA toolkit.
# A C compiler stays: Triton (vLLM's kernels, torch.compile) builds its small GPU launcher with the
# host compiler and Python.h at run time. No nvcc: DeepSpeed's just-in-time ops (fused/CPU Adam,
# offload) are not used by the configs the operator writes (torch's AdamW via TRL, no offload);
# a job that needs them must bring an image built on a CUDA devel base.
FROM base AS trainer
# Pinning Debian package versions (DL3008) would break the build at the next bookworm point
# release, which drops the old versions from the archive; the digest-pinned base fixes the suite.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
COPY --from=trainer-deps /opt/venv /opt/venv
COPY --from=project /wheels/ /tmp/wheels/
RUN pip install --no-deps /tmp/wheels/*.whl \
    && rm -rf /tmp/wheels
ENV NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility \
    DS_BUILD_OPS=0 \
    HOME=/home/g2rpo
USER 1000:1000
WORKDIR /home/g2rpo
#checkov:skip=CKV_DOCKER_2: Kubernetes ignores HEALTHCHECK; the rollout pods probe vLLM's /health, trainer pods are batch Jobs.
CMD ["python", "-m", "g2rpo.train", "--help"]

# syntax=docker/dockerfile:1
# One Dockerfile, two images (the same `pip install .[extra]` as the tests), tagged with the one
# version, pyproject.toml's (`make version`; the chart's appVersion and the operator's default
# worker image follow it, tests/unit/test_packaging.py checks):
#
#   make images    # or:
#   docker build --target operator --build-arg VERSION=$(make -s version) \
#     -t ghcr.io/imagebatch/imagebatch-operator:$(make -s version) .
#   docker build --target worker --build-arg VERSION=$(make -s version) \
#     -t ghcr.io/imagebatch/imagebatch-worker:$(make -s version) .
#
# Only the product goes in: .dockerignore lets in pyproject.toml, README.md, imagebatch/, operator/
# and worker/; the test harness (testing/) and tests/ stay out.
#
# The worker gets PyTorch from PyPI, whose Linux x86_64 wheels bundle CUDA (the nvidia-* wheels);
# only the NVIDIA driver comes from the node (the NVIDIA container toolkit / device plugin).
# Both run as the non-root user 1000 (the uid the operator's worker pods and the chart ask for).

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

FROM ${PYTHON_IMAGE} AS base
# `make images` passes pyproject.toml's version; the label says which release an image is.
ARG VERSION
LABEL org.opencontainers.image.title="imagebatch" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0"
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_ROOT_USER_ACTION=ignore
RUN groupadd --gid 1000 imagebatch \
    && useradd --uid 1000 --gid 1000 --create-home --home-dir /home/imagebatch --shell /usr/sbin/nologin imagebatch
# The source only for `pip install`; README.md is optional (pyproject's readme).
WORKDIR /src
COPY pyproject.toml README.m[d] ./
COPY imagebatch/ imagebatch/
COPY operator/ operator/
COPY worker/ worker/

# --- the operator: kopf, no torch --------------------------------------------------------------
FROM base AS operator
# Every dependency is pinned in pyproject.toml.
# hadolint ignore=DL3013
RUN pip install ".[operator]" && rm -rf /src
# Not the source folder: a folder named operator/ on sys.path would shadow Python's own module.
WORKDIR /home/imagebatch
USER 1000:1000
EXPOSE 8080 8081
ENTRYPOINT ["python", "-m", "imagebatch.operator"]

# --- the worker: torch (CUDA), diffusers ---------------------------------------------------------
FROM base AS worker
# hadolint ignore=DL3013
RUN pip install ".[worker]" && rm -rf /src
ENV HF_HOME=/home/imagebatch/.cache/huggingface
WORKDIR /home/imagebatch
USER 1000:1000
EXPOSE 9090
ENTRYPOINT ["imagebatch", "worker"]

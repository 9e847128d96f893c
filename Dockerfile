# syntax=docker/dockerfile:1.7
#
# metalearn: the few-shot adaptation service (and the trainer, same image).
#
#   docker build -t metalearn:cpu .                                   # CPU (default)
#   docker build -t metalearn:cuda --build-arg VARIANT=cuda .         # NVIDIA GPU
#   docker run -p 8000:8000 -v "$PWD/runs:/models" metalearn:cpu
#   docker run --gpus all -p 8000:8000 -v "$PWD/runs:/models" metalearn:cuda
#
# torch comes from the PyTorch wheel index (CPU or CUDA build). Where a torch
# wheel is already on local disk (on our build machines it is: /opt/wheels has
# torch-2.13.0+cpu), hand it in as a build context and pip takes it from there
# instead of the network:
#
#   docker build --build-context wheels=/opt/wheels -t metalearn:cpu .
#
# Stages: base-cpu / base-cuda (the runtime OS + Python 3.11), builder (a venv
# with torch and metalearn installed from wheels), runtime (the venv copied
# onto the bare base, non-root user, /models volume, healthcheck).

ARG VARIANT=cpu
ARG TORCH_VERSION=2.13.0
# CUDA 12.8: the runtime image and the matching torch wheel index (cu128)
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu22.04
ARG TORCH_CUDA_INDEX=https://download.pytorch.org/whl/cu128
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu

# Local wheels (empty unless `--build-context wheels=DIR` is given).
FROM scratch AS wheels

# ---- runtime bases ------------------------------------------------------------
FROM python:3.11-slim-bookworm AS base-cpu

FROM ${CUDA_IMAGE} AS base-cuda
ENV DEBIAN_FRONTEND=noninteractive \
    NVIDIA_VISIBLE_DEVICES=all \
    NVIDIA_DRIVER_CAPABILITIES=compute,utility
# Ubuntu 22.04's Python 3.11, so the builder's venv runs unchanged in the runtime stage.
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.11 python3.11-venv ca-certificates \
    && rm -rf /var/lib/apt/lists/* \
    && ln -s /usr/bin/python3.11 /usr/local/bin/python

# The base is a stage picked by VARIANT (base-cpu or base-cuda), whose images are tagged
# above; hadolint cannot resolve the variable, hence the one ignore (see .hadolint.yaml).
# hadolint ignore=DL3006
FROM base-${VARIANT} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH

# ---- builder --------------------------------------------------------------------
FROM base AS builder
ARG VARIANT
ARG TORCH_VERSION
ARG TORCH_CPU_INDEX
ARG TORCH_CUDA_INDEX
ENV PIP_ROOT_USER_ACTION=ignore \
    PIP_NO_CACHE_DIR=1
WORKDIR /src
RUN python -m venv /opt/venv
# torch first, from the variant's index (or the local wheels), so the project
# install below finds it satisfied and never pulls another build
RUN --mount=type=bind,from=wheels,target=/wheels \
    if [ "${VARIANT}" = "cuda" ]; then index="${TORCH_CUDA_INDEX}"; else index="${TORCH_CPU_INDEX}"; fi \
    && pip install --no-cache-dir --find-links /wheels --index-url "${index}" "torch==${TORCH_VERSION}"
COPY pyproject.toml README.md ./
COPY metalearn ./metalearn
COPY service ./service
RUN pip install --no-cache-dir . \
    && python -c "import metalearn, service, torch; print('torch', torch.__version__)"

# ---- runtime --------------------------------------------------------------------
FROM base AS runtime
ARG VARIANT
LABEL org.opencontainers.image.title="metalearn" \
      org.opencontainers.image.description="Meta-learning toolkit and few-shot adaptation service" \
      org.opencontainers.image.licenses="MIT" \
      ai.metalearn.variant="${VARIANT}"
RUN groupadd --system --gid 10001 metalearn \
    && useradd --system --uid 10001 --gid metalearn --home-dir /home/metalearn --create-home --shell /usr/sbin/nologin metalearn \
    && mkdir -p /models \
    && chown metalearn:metalearn /models
COPY --from=builder /opt/venv /opt/venv
ENV METALEARN_MODEL_DIR=/models \
    MPLCONFIGDIR=/tmp/matplotlib
WORKDIR /home/metalearn
USER 10001:10001
VOLUME ["/models"]
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]
CMD ["metalearn", "serve", "--model-dir", "/models", "--host", "0.0.0.0", "--port", "8000"]

# syntax=docker/dockerfile:1.7
# mocoplus images. Two targets:
#   serve     the HTTP service and the search CLI: ONNX Runtime + FAISS, no PyTorch
#   pipeline  training, export, embedding, indexes and the Prefect flows: with PyTorch
# GPU (default): CUDA runtime base, onnxruntime-gpu, faiss-gpu, CUDA PyTorch wheels: one CUDA major, 12,
#                for all three (base 12.6 with cuDNN 9, torch cu126, onnxruntime-gpu <1.27, faiss-gpu <1.16;
#                pyproject's `gpu` extra pins the same ranges).
# CPU-only:      --build-arg BASE_IMAGE=ubuntu:24.04 --build-arg VARIANT=cpu
#
#   docker build --target serve -t mocoplus-serve .
#   docker run --gpus all -p 8000:8000 -v $PWD/models/fmnist:/models/model:ro \
#       -v $PWD/indexes/fmnist:/models/index:ro mocoplus-serve \
#       serve --model /models/model --index /models/index --host 0.0.0.0 --provider cuda
#   docker build --target pipeline -t mocoplus .
#   docker run --gpus all -v $PWD/data:/data mocoplus train --data /data/shards --out /data/run

ARG BASE_IMAGE=nvidia/cuda:12.6.3-cudnn-runtime-ubuntu24.04

FROM ${BASE_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    VIRTUAL_ENV=/opt/venv \
    PATH=/opt/venv/bin:$PATH
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv ca-certificates libgomp1 \
    && rm -rf /var/lib/apt/lists/* \
    && groupadd --gid 10001 mocoplus \
    && useradd --uid 10001 --gid mocoplus --create-home --shell /usr/sbin/nologin mocoplus

FROM base AS build-base
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml README.md ./
COPY mocoplus ./mocoplus
COPY artifacts ./artifacts
COPY pipeline ./pipeline
COPY flows ./flows
COPY serving ./serving

# serve: only what `mocoplus serve` and `mocoplus search` import; the package goes in without its
# dependencies so that torch, torchvision and prefect stay out of the image.
FROM build-base AS serve-build
ARG VARIANT=gpu
# $runtime is split into its package specifiers on purpose
# hadolint ignore=SC2086
RUN if [ "$VARIANT" = "gpu" ]; then runtime="onnxruntime-gpu>=1.21,<1.27 faiss-gpu>=1.14.3,<1.16"; \
    else runtime="onnxruntime>=1.18 faiss-cpu>=1.8"; fi \
    && pip install $runtime "numpy>=1.26" "pillow>=10.0" "fastapi>=0.110,<0.151" "uvicorn>=0.29" \
       "python-multipart>=0.0.9" "prometheus-client>=0.20" "uvloop>=0.19" "httptools>=0.6" \
       "typer>=0.12" "rich>=13.0" "fastapi-offline>=1.7" \
    && pip install --no-deps .

FROM base AS serve
COPY --from=serve-build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/mocoplus
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4)"]
ENTRYPOINT ["mocoplus"]
CMD ["serve", "--model", "/models/model", "--index", "/models/index", "--host", "0.0.0.0"]

# pipeline: the whole package with PyTorch (CUDA wheels from PyTorch's index on the GPU variant).
FROM build-base AS pipeline-build
ARG VARIANT=gpu
ARG TORCH_INDEX=https://download.pytorch.org/whl/cu126
RUN if [ "$VARIANT" = "gpu" ]; then \
        pip install --extra-index-url "$TORCH_INDEX" "torch>=2.4,<2.15" "torchvision>=0.19,<0.30" \
        && pip install ".[gpu]"; \
    else \
        pip install --extra-index-url https://download.pytorch.org/whl/cpu "torch>=2.4,<2.15" "torchvision>=0.19,<0.30" \
        && pip install ".[cpu]"; \
    fi

FROM base AS pipeline
COPY --from=pipeline-build /opt/venv /opt/venv
USER 10001:10001
WORKDIR /home/mocoplus
ENV PREFECT_HOME=/home/mocoplus/.prefect PREFECT_SERVER_ANALYTICS_ENABLED=false
HEALTHCHECK NONE
ENTRYPOINT ["mocoplus"]
CMD ["--help"]

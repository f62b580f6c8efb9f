# qzoom: the HTTP service (`qzoom serve`) in one image. Two variants, by build argument:
#   docker build --build-arg VARIANT=cuda -t qzoom:cuda .   # GPU (torch's default Linux wheels bundle CUDA)
#   docker build --build-arg VARIANT=cpu  -t qzoom:cpu  .   # CPU; pass PIP_INDEX_URL=<a CPU-only torch index>
#                                                            # to avoid downloading the CUDA libraries
# No weights are downloaded at serve time (HF_HUB_OFFLINE=1): mount a checkpoint directory and set QZOOM_MODEL.
FROM python:3.11-slim-bookworm

ARG VARIANT=cuda
ARG PIP_INDEX_URL=
ENV PIP_NO_CACHE_DIR=1 PYTHONUNBUFFERED=1

WORKDIR /app
# torch first (the pin of pyproject), then the project: the same two steps `.ci/run` runs outside Docker.
RUN if [ -n "$PIP_INDEX_URL" ]; then pip install --index-url "$PIP_INDEX_URL" torch==2.13.0; \
    else pip install torch==2.13.0; fi
COPY pyproject.toml README.md ./
COPY qzoom ./qzoom
COPY agent ./agent
COPY tools ./tools
COPY service ./service
COPY evals ./evals
RUN pip install .

ENV HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 QZOOM_MODEL=/models/qzoom
ENV QZOOM_DEVICE=${VARIANT}
RUN useradd --create-home qzoom && mkdir -p /models && chown qzoom /models
USER qzoom
EXPOSE 8000
HEALTHCHECK --interval=10s --timeout=5s --start-period=600s --retries=5 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4)"]
CMD ["qzoom", "serve", "--host", "0.0.0.0", "--port", "8000"]

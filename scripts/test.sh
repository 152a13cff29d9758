#!/usr/bin/env bash
# The test suite (sets itself up on first run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
sharp_setup test
# torch is only the reference the tests compare against: where it cannot be installed at all,
# the tests that need it skip and say so.
if ! python -c "import torch, accelerate" 2>/dev/null; then
    python -m pip install -q -e ".[reference]" || echo "warning: torch==2.13.0 could not be installed; reference tests will skip" >&2
fi
# Formatting and lint drift fail the run before any test does.
ruff format --check --quiet . || { echo "error: files need formatting: run \`ruff format .\`" >&2; exit 1; }
ruff check --quiet .
exec python -m pytest -q "$@"

#!/usr/bin/env bash
# The main job on the embedded default model (sets itself up on first run).
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/_env.sh
sharp_setup
exec python -m sharp_mlx.pipeline "$@"

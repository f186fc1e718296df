#!/usr/bin/env bash
# Compile every zoo model for `cuda`, run it on the GPU, check it against eager PyTorch and time it:
# the one short GPU check (run it where a GPU is lent, e.g. through the device tool).  Without a
# GPU it says so and exits 0, having compiled nothing.
#
#   scripts/gpu_check.sh [--json PATH] [--models a,b] [--rounds N]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
exec "$PY" scripts/gpu_check.py "$@"

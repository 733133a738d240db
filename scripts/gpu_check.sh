#!/usr/bin/env bash
# GPU check (one CUDA GPU, < 8 min): extract throughput, cached/plain/online AT steps, peak memory,
# online == cached targets on the GPU. `--dry-run` runs the same code at tiny size on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" scripts/gpu_check.py "$@"

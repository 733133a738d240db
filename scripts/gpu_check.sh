#!/usr/bin/env bash
# GPU check (one CUDA GPU, a few minutes): `pipeline bench --profile gpu` (extract throughput,
# cached/plain/online AT steps, peak memory, online == cached targets on the GPU) into
# artifacts/bench/gpu.json. `--dry-run` runs the same code at tiny sizes on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=python
[ -x .venv/bin/python ] && PY=.venv/bin/python
exec "$PY" -m pipeline bench --profile gpu --out artifacts/bench/gpu.json "$@"

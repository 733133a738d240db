#!/usr/bin/env bash
# The finished sweep experiments (scripts/sweep.sh) -> results/sweep/{runs,probe}.json, sweep.png and
# the sweep table in docs/results.md. Safe to run while the queue still works: it takes what has finished.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
mkdir -p results/sweep
dvc exp show --json > /tmp/sweep-exp-show.json
python - <<'PYEOF'
import json
from pipeline.report.sweep import collect
runs = collect(json.load(open("/tmp/sweep-exp-show.json")))
open("results/sweep/runs.json", "w").write(json.dumps(runs, indent=2) + "\n")
print(f"{len(runs)} experiments -> results/sweep/runs.json")
PYEOF
python -m pipeline cache probe artifacts/feats.zarr --out results/sweep/probe.json  # the probe the store records
python -m pipeline report --sweep results/sweep/runs.json --probe results/sweep/probe.json \
  --out artifacts/sweep_report --readme docs/results.md#sweep
cp artifacts/sweep_report/sweep.png results/sweep/sweep.png

#!/usr/bin/env bash
# The DRA sweep (issue 16) as DVC experiments: every (t, layer) target set of the cache x the DRA
# weights, plus lambda = 0, one seed each. An experiment re-runs only train-sweep and
# evaluate-sweep (AT+DRA on that set, validation images of the train split); nothing is
# re-extracted. Needs a finished `dvc repro` (the cache's target sets: params.yaml extract.t/layer).
# Writes results/sweep/{runs,probe}.json and sweep.png, and the sweep table in docs/results.md.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PWD/.venv/bin:$PATH"
TS=${TS:-"100 20 400"}
LAYERS=${LAYERS:-"mid_block up_blocks.0"}
WEIGHTS=${WEIGHTS:-"0.1 0.25 0.5 1.0"}  # 0.1 added after the first run found its best cell at 0.25, the edge
dvc status extract | grep -q "up to date" || { echo "error: run dvc repro first (the cache is not up to date)"; exit 1; }
dvc commit -f -q data.dvc  # the dataset in the DVC cache: each experiment's workspace restores it from there
# each experiment reproduces only the sweep stages (and what they need: upstream stages are up to
# date and restored from the DVC cache); one weight's whole t x layer grid before the next weight
dvc exp run --queue -S sweep.dra_weight=0 train-sweep evaluate-sweep
for w in $WEIGHTS; do
  for t in $TS; do
    for layer in $LAYERS; do
      dvc exp run --queue -S "sweep.t=$t" -S "sweep.layer=$layer" -S "sweep.dra_weight=$w" train-sweep evaluate-sweep
    done
  done
done
dvc queue start -j 1
sleep 60  # the worker needs a moment before its tasks show as Running
while dvc queue status | grep -qE "Queued|Running"; do sleep 30; done
dvc queue status
bash scripts/sweep_collect.sh

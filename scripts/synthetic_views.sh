#!/usr/bin/env bash
# DM-AT with K_syn = 1 vs 4 recorded views per synthetic image (issue 15: synthetic images are
# augmented like real ones; this measures what that changes). Same budget, seeds 0-2, PGD-20 x2 on
# 1000 test images. Uses the default pipeline's artifacts; writes results/synthetic_views/*.json.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
W=${WORK:-/tmp/kviews}
mkdir -p "$W" results/synthetic_views
[ -d "$W/feats_k1.zarr" ] || $PY -m pipeline extract --model artifacts/diffusion --real-splits artifacts/shards/real \
  --synthetic artifacts/shards/synthetic --out "$W/feats_k1.zarr" --views 4 --views-synthetic 1 --limit 10000
for k in 1 4; do
  cache=$([ "$k" = 1 ] && echo "$W/feats_k1.zarr" || echo artifacts/feats.zarr)
  for seed in 0 1 2; do
    out="$W/train/k$k-s$seed"
    [ -f "results/synthetic_views/k$k-s$seed.json" ] && continue
    $PY -m pipeline train --cache "$cache" --out "$out" --overwrite --dra-weight 0 --synthetic-fraction 0.7 --seed "$seed" \
      --arch cnn --method pgd --eps 0.1 --attack-steps 5 --step-size 0.03 --target-norm center \
      --real-limit 10000 --epochs 3 --batch-size 128 --lr 0.2
    $PY -m pipeline evaluate --checkpoint "$out" --shards artifacts/shards/real/test --n 1000 --eps 0.1 \
      --pgd-steps 20 --pgd-restarts 2 --autoattack none --name "DM-AT K_syn=$k" \
      --out "results/synthetic_views/k$k-s$seed.json" --metrics "$W/metrics/k$k-s$seed.json"
  done
done

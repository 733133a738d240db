#!/usr/bin/env bash
# What the K-view limit costs (issue 17): plain AT (no DRA) trained on K = 1, 4 or all recorded views
# per image versus fresh on-the-fly crop + flip, at one budget (the default's 237 steps of 128),
# seeds 0-2, PGD-20 x2 on 1000 test images. The cache's features are not used by plain AT, so
# a default-size UNet with random weights stands in for the trained one (its extraction time and
# storage per image are what a trained one costs too). Writes results/views/*.json (evaluations)
# and results/views/extract.json (seconds and feature bytes per image at each K, one run).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
W=${WORK:-/tmp/views-ablation}
mkdir -p "$W" results/views
[ -f artifacts/shards/real/train/fingerprint.json ] || $PY -m pipeline prepare --source data/fashion-mnist --out artifacts/shards/real
[ -d "$W/unet" ] || $PY - "$W/unet" <<'PYEOF'
import sys, torch
from pipeline.diffusion.config import DiffusionConfig
from pipeline.diffusion.model import build_unet, make_scheduler, save_model
d = DiffusionConfig()
torch.manual_seed(0)
unet = build_unet(image_size=28, in_channels=1, num_classes=10, block_channels=d.block_channels,
                  layers_per_block=d.layers_per_block)
save_model(sys.argv[1], unet, make_scheduler(d.num_train_timesteps, d.beta_schedule), {})
PYEOF
for k in 1 4 all; do
  [ -f "$W/k$k.zarr/zarr.json" ] && grep -q '"complete": true' "$W/k$k.zarr/zarr.json" && continue
  start=$(date +%s.%N)
  $PY -m pipeline extract --model "$W/unet" --real-splits artifacts/shards/real --synthetic "" --out "$W/k$k.zarr" \
    --views "$k" --limit 10000
  echo "$k $(echo "$(date +%s.%N) - $start" | bc)" >> "$W/extract_seconds.txt"
done
$PY - "$W" <<'PYEOF'
import json, sys
from pathlib import Path
from pipeline.cache.store import open_cache
w = Path(sys.argv[1])
secs = {line.split()[0]: float(line.split()[1]) for line in (w / "extract_seconds.txt").read_text().splitlines()}
out = {}
for k in ("1", "4", "all"):
    p = open_cache(str(w / f"k{k}.zarr")).part("train")
    feats = w / f"k{k}.zarr" / "train" / "targets" / p.target.name / "features"
    disk = sum(f.stat().st_size for f in feats.rglob("*") if f.is_file())
    out[k] = {"K": p.k, "n_images": p.n, "feature_bytes_on_disk_per_image": disk / p.n,
              "raw_bytes_per_image": p.k * p.d * 2, "extract_seconds_whole_stage": secs.get(k),
              "note": "whole extract command for the train part (K views) + the test part (1 view) of 10k images each"}
out["machine"] = open("/proc/cpuinfo").read().split("model name")[1].split("\n")[0].strip(": \t")
Path("results/views/extract.json").write_text(json.dumps(out, indent=2) + "\n")
PYEOF
for mode in k1 k4 kall fresh; do
  case $mode in k1) cache="$W/k1.zarr"; extra="" ;; k4) cache="$W/k4.zarr"; extra="" ;;
    kall) cache="$W/kall.zarr"; extra="" ;; fresh) cache="$W/k1.zarr"; extra="--fresh-views" ;; esac
  name=$(case $mode in k1) echo "AT K=1";; k4) echo "AT K=4";; kall) echo "AT K=all (50)";; fresh) echo "AT on-the-fly";; esac)
  for seed in 0 1 2; do
    [ -f "results/views/$mode-s$seed.json" ] && continue
    out="$W/train/$mode-s$seed"
    $PY -m pipeline train --cache "$cache" --out "$out" --overwrite --dra-weight 0 --synthetic-fraction 0 --seed "$seed" \
      --arch cnn --method pgd --eps 0.1 --attack-steps 5 --step-size 0.03 --real-limit 10000 --epochs 3 \
      --batch-size 128 --lr 0.2 $extra
    $PY -m pipeline evaluate --checkpoint "$out" --shards artifacts/shards/real/test --n 1000 --eps 0.1 \
      --pgd-steps 20 --pgd-restarts 2 --autoattack none --name "$name" \
      --out "results/views/$mode-s$seed.json" --metrics "$W/metrics/$mode-s$seed.json"
  done
done

#!/usr/bin/env bash
# Every stage end to end on whatever device `--device auto` picks (one CUDA GPU where there is one),
# at a small size: prepare, diffusion (a small UNet trained from scratch: samples are poor, the
# code path is what is checked), generate, extract (spatial
# targets, every view), train (TRADES + EMA, DM-AT mixing, DRA per location with per-epoch
# validation), evaluate (PGD and AutoAttack-fast). Ends with what each output recorded about its
# device and precision. A few minutes on a GPU; on a CPU use small sizes, e.g.
#   LIMIT=200 SYNTHETIC=32 DIFFUSION_STEPS=3 EPOCHS=1 VIEWS=4 bash scripts/gpu_e2e.sh
# Sizes: LIMIT (real images per split), SYNTHETIC (generated images), DIFFUSION_STEPS, EPOCHS, VIEWS
# (of each real image in the cache: all, or a number);
# SRC: the raw dataset (default data/fashion-mnist); WORK: the output folder (made anew); both
# relative to the repository root. PY: the interpreter (default .venv/bin/python, else python).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${PY:-}" ]; then PY=python; [ -x .venv/bin/python ] && PY=.venv/bin/python; fi
SRC=${SRC:-data/fashion-mnist} W=${WORK:-artifacts/gpu-e2e}
LIMIT=${LIMIT:-2000} SYNTHETIC=${SYNTHETIC:-500} DIFFUSION_STEPS=${DIFFUSION_STEPS:-200} EPOCHS=${EPOCHS:-2}
VIEWS=${VIEWS:-all}
HALF=$((LIMIT / 2))
if [ -e "$W" ] && [ ! -f "$W/.gpu-e2e" ]; then  # only ever delete this script's own earlier output
  echo "error: $W exists and is not an earlier output of this script; choose another WORK" >&2; exit 2
fi
rm -rf "$W" && mkdir -p "$W" && touch "$W/.gpu-e2e"
step() { echo "== $*" >&2; local t0=$SECONDS; "$PY" -m pipeline "$@"; echo "   $((SECONDS - t0)) s" >&2; }

step prepare --source "$SRC" --out "$W/shards/real" --limit "$LIMIT" --shard-size 1000
step diffusion --shards "$W/shards/real/train" --out "$W/diffusion" --pretrained '' \
  --block-channels 32,64,64 --steps "$DIFFUSION_STEPS" --batch-size 128 --warmup-steps 0
step generate --model "$W/diffusion" --real-train "$W/shards/real/train" --real-test "$W/shards/real/test" \
  --out "$W/shards/synthetic" --n "$SYNTHETIC" --sampler ddim --sample-steps 20 --guidance 2.0 \
  --classifier-arch resnet --classifier-epochs 1
step extract --model "$W/diffusion" --real-splits "$W/shards/real" --synthetic "$W/shards/synthetic/train" \
  --out "$W/feats.zarr" --t 100,400 --layer mid_block,up_blocks.0 --pooling grid4 --views "$VIEWS" \
  --views-synthetic 4 --batch-size 256
step train --cache "$W/feats.zarr" --out "$W/run" --arch resnet --method trades --trades-beta 5 \
  --label-smoothing 0.1 --ema-decay 0.995 --synthetic-fraction 0.7 --dra-weight 0.5 --t 400 \
  --layer up_blocks.0 --align-layer layers.1 --align-input adv --dra-grad-every 5 --real-limit "$HALF" \
  --epochs "$EPOCHS" --val-n "$HALF" --val-every 1 --val-pgd-steps 5 --batch-size 128 --lr 0.2
step evaluate --checkpoint "$W/run/best" --shards "$W/shards/real/test" --name "AT+DRA (e2e)" \
  --out "$W/eval.json" --n "$HALF" --autoattack fast --autoattack-n "$((HALF / 2))"

"$PY" - "$W" <<'EOF'
import json, sys
from pathlib import Path

w = Path(sys.argv[1])
def show(path, keys):
    d = json.loads(path.read_text())
    flat = {**d, **{f"{k}.{k2}": v2 for k, v in d.items() if isinstance(v, dict) for k2, v2 in v.items()}}
    print(f"{path.relative_to(w)}: " + ", ".join(f"{k}={flat[k]}" for k in flat
                                                   if any(s in k.split(".")[-1] for s in keys)))
for p in sorted(w.rglob("*.json")):
    if p.name in ("model_info.json", "generate.json", "metrics.json", "eval.json") and "dvclive" not in p.parts:
        show(p, ("device", "precision", "cpu", "clean", "pgd", "autoattack", "seconds", "agreement"))
EOF

#!/usr/bin/env bash
# The generator's levers, each measured by generate's quality report with ONE reference classifier
# (trained once by the first setting, reused with --reference): classifier-free guidance scales,
# the model at several training steps (diffusion --snapshot-every), and filtering with the
# reference classifier. Each setting writes results/generator/NAME/generate.json (+ its grid);
# `python -m pipeline report --generator results/generator` makes the table (docs/results.md).
#
#   MODEL=artifacts/generator/ddpm-600 scripts/generator_levers.sh
#
# MODEL is a `diffusion` output folder trained with --snapshot-every (MODEL.snapshots/step-N are the
# curve's points). Resumable: a setting whose generate.json is committed is skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
MODEL=${MODEL:-artifacts/generator/ddpm-600}
N=${N:-1000}
W=${WORK:-/tmp/generator-levers}
R=results/generator
mkdir -p "$W" "$R"
ref="$W/ref"

run() {  # NAME MODEL_DIR [generate flags...]
  local name=$1 model=$2
  shift 2
  [ -f "$R/$name/generate.json" ] && return 0
  local reference=()
  [ -d "$ref" ] && reference=(--reference "$ref")
  rm -rf "$W/$name"
  $PY -m pipeline generate --model "$model" --real-train artifacts/shards/real/train \
    --real-test artifacts/shards/real/test --out "$W/$name" --n "$N" --quality-n "$N" --sample-steps 20 \
    --seed 0 "${reference[@]}" "$@"
  [ -d "$ref" ] || cp -r "$W/$name/reference" "$ref"
  mkdir -p "$R/$name"
  cp "$W/$name/generate.json" "$W/$name/grid.png" "$R/$name/"
}

run cfg1.0 "$MODEL" --guidance 1.0
for g in 2.0 3.0 5.0; do run "cfg$g" "$MODEL" --guidance "$g"; done
total=$($PY -c "import json, sys; print(json.load(open(sys.argv[1]))['config']['steps'])" "$MODEL/model_info.json")
for snap in "$MODEL".snapshots/step-*; do
  [ -d "$snap" ] || continue
  step=$((10#${snap##*step-}))
  [ "$step" -lt "$total" ] || continue  # the last snapshot is the model itself (cfg3.0)
  run "steps$(printf %04d "$step")-cfg3.0" "$snap" --guidance 3.0
done
run cfg3.0-agree0.9 "$MODEL" --guidance 3.0 --filter agree --min-confidence 0.9
$PY -m pipeline report --generator "$R" --out "$W/report" --readme docs/results.md#generator

#!/usr/bin/env bash
# The study (issue 20): pipeline/params/study.yaml through the project's dvc.yaml, one run at a
# time, in a git worktree (.study/) pinned to the commit it was created from. The worktree has its
# own params.yaml (the study profile *of that commit*), dvc.lock, outputs and DVC cache, so the main
# checkout and the default pipeline are untouched and every run of the study uses the same code,
# profile, diffusion model, synthetic set and cache.
#
# Order: seed-major (the four variants of seed 0, then of seed 1, ...), so a stopped study leaves
# complete pairs. Each finished run's evaluation is copied to results/study/<run key>/seed<k>.json
# (run key: at, at_dra, dmat, dmat_dra; with the pinned commit) and committed at once, together with
# the study table in docs/results.md and the plots (results/study-report/) regenerated from results/study (so
# commit its prose first); likewise the AutoAttack comparison (results/study-aa-report/). A re-run
# first commits results a failed commit left behind, then skips runs that have a result; a run that
# was interrupted starts again from scratch (`dvc repro` re-runs the whole stage).
#
#   bash scripts/study.sh                   # every run of the profile
#   RUNS="at-s0 at_dra-s0" bash scripts/study.sh
#   MINUTES=70 bash scripts/study.sh        # a piece: starts no new run after 70 minutes
#   AA_STANDARD=1 bash scripts/study.sh     # then AutoAttack standard and the fast subset on the same
#                                           # 300 test images for one seed of each variant
#                                           # (results/study-aa-{standard,fast}/VARIANT/seedK.json)
#   AA_SEED=2 ...                           # that seed (default 0; its checkpoints must be in .study)
#   COMMIT=0 ...                            # write results without committing them
#   rm -rf .study && git worktree prune     # to start over on the current commit (results kept)
#
# Another profile runs the same way, in its own worktree and results (NAME = the profile's file name):
#   PROFILE=pipeline/params/default-seeds.yaml BASELINE=DM-AT:AT bash scripts/study.sh
# -> worktree .NAME/, results/NAME/<run key>/seed<k>.json, plots results/NAME-report/, table between
# <!-- NAME:begin/end --> in docs/results.md (BASELINE: the report's paired differences, VARIANT:BASE,...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
export PATH="$ROOT/.venv/bin:$PATH" DVC_NO_ANALYTICS=1
PROFILE=${PROFILE:-pipeline/params/study.yaml}
NAME=$(basename "$PROFILE" .yaml)
BASELINE=${BASELINE:-AT+DRA:AT,DM-AT+DRA:DM-AT}
WT=$ROOT/.$NAME
COMMIT=${COMMIT:-1}
DEADLINE=$(( $(date +%s) + ${MINUTES:-100000} * 60 ))

if [ ! -d "$WT" ]; then
  [ -n "$(git ls-files -- "$PROFILE")" ] && git diff --quiet HEAD -- "$PROFILE" || {
    echo "error: $PROFILE is not committed as it is; the study runs the committed profile"; exit 1; }
  git worktree prune
  git worktree add --detach "$WT" HEAD
  mkdir -p "$WT/data" && cp -r data/fashion-mnist "$WT/data/"
fi
PIN=$(git -C "$WT" rev-parse HEAD)
git -C "$WT" show "$PIN:$PROFILE" > "$WT/params.yaml"
ART=$(python -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['artifacts'])" "$WT/params.yaml")
RUNS=${RUNS:-$(python - "$WT/params.yaml" <<'PYEOF'
import sys, yaml
runs = yaml.safe_load(open(sys.argv[1]))["runs"]
print(" ".join(sorted(runs, key=lambda k: (runs[k]["seed"], list(runs).index(k)))))
PYEOF
)}

commit() {  # the given result files, alone (other staged changes stay staged)
  [ "$COMMIT" = 1 ] || return 0
  local try
  for try in 1 2 3 4 5; do  # another git command in the checkout (its index.lock) fails a commit: wait and retry
    git add -- "$@" && git commit -q -m "$MSG" -- "$@" && break
    [ "$try" = 5 ] && { echo "error: could not commit $*; the next run of study.sh commits it"; exit 1; }
    sleep 10
  done
  echo "committed $*"
}

# results that a failed commit left behind
LEFT=$(git ls-files --others --modified --exclude='*.tmp' -- "results/$NAME" "results/$NAME-aa-standard" "results/$NAME-aa-fast")
if [ -n "$LEFT" ]; then MSG="study: results of an earlier piece" commit $LEFT; fi

publish() {  # the run's evaluation + the study's commit -> results/..., committed
  local src=$1 dst=$2
  mkdir -p "$(dirname "$dst")"
  python - "$src" "$dst" "$PIN" "$PROFILE" <<'PYEOF'
import json, os, sys
res = json.load(open(sys.argv[1]))
res["study"] = {"code_commit": sys.argv[3], "profile": sys.argv[4], "driver": "scripts/study.sh"}
open(sys.argv[2] + ".tmp", "w").write(json.dumps(res, indent=2) + "\n")
os.replace(sys.argv[2] + ".tmp", sys.argv[2])
PYEOF
  local files=("$dst")
  case "$dst" in  # the tables in docs/results.md and the plots regenerate with every result (a test checks the tables)
    "results/$NAME"/*)
      local pairs  # the baseline pairs whose two variants have results (the first runs have one variant)
      pairs=$(python - "$BASELINE" "results/$NAME" <<'PYEOF'
import json, pathlib, sys
have = {json.loads(p.read_text())["variant"] for p in pathlib.Path(sys.argv[2]).glob("*/seed*.json")}
print(",".join(p for p in sys.argv[1].split(",") if set(p.split(":")) <= have))
PYEOF
)
      python -m pipeline report --evals "results/$NAME" --train "" --grid "" --baseline "$pairs" \
        --out "results/$NAME-report" --readme "docs/results.md#$NAME" > /dev/null
      files+=(docs/results.md "results/$NAME-report") ;;
    "results/$NAME-aa-fast"/*)  # each standard result before its fast one: every pair is complete here
      python -m pipeline report --evals "results/$NAME-aa-fast" --aa-standard "results/$NAME-aa-standard" \
        --out "results/$NAME-aa-report" --readme "docs/results.md#$NAME-aa" > /dev/null
      files+=(docs/results.md "results/$NAME-aa-report") ;;
  esac
  MSG=$(python -c "import json, sys; r = json.load(open(sys.argv[1])); print(f\"$NAME: {sys.argv[2]} ({r['variant']}): clean {r['clean']:.4f}, PGD {r['pgd']:.4f}, AutoAttack {r['autoattack']}\")" "$dst" "$(basename "$(dirname "$dst")")/$(basename "$dst" .json)") \
    commit "${files[@]}"
}

time_left() {
  [ "$(date +%s)" -lt "$DEADLINE" ] || { echo "study: time is up (MINUTES=$MINUTES); the next piece resumes here"; return 1; }
}

for key in $RUNS; do
  dst="results/$NAME/${key%-s*}/seed${key##*-s}.json"
  [ -f "$dst" ] && continue
  time_left || exit 0
  echo "study: $key ($(date +%H:%M:%S), commit ${PIN:0:10})"
  (cd "$WT" && dvc repro -q "evaluate@$key")
  publish "$WT/$ART/eval/$key.json" "$dst"
done

if [ "${AA_STANDARD:-0}" = 1 ]; then  # how far AutoAttack-fast is from standard: one seed of each variant
  AA_SEED=${AA_SEED:-0}
  # the same 300 test images under both: standard, and the fast subset with the profile's settings
  read -r TARGETS ITERS EPS < <(python -c "import yaml, sys; e = yaml.safe_load(open(sys.argv[1]))['evaluate']; print(e['fast_targets'], e['fast_iters'], e['eps'])" \
    "$WT/params.yaml")
  for key in $(echo "$RUNS" | tr ' ' '\n' | grep -- "-s$AA_SEED\$" || true); do
    [ -f "$WT/$ART/train/$key/metrics.json" ] || { echo "error: $key has not been trained in $WT"; exit 1; }
    variant=$(python -c "import yaml, sys; print(yaml.safe_load(open(sys.argv[1]))['runs'][sys.argv[2]]['variant'])" \
      "$WT/params.yaml" "$key")
    for version in standard fast; do
      dst="results/$NAME-aa-$version/${key%-s*}/seed$AA_SEED.json"
      [ -f "$dst" ] && continue
      time_left || exit 0
      (cd "$WT" && python -m pipeline evaluate --checkpoint "$ART/train/$key" --shards "$ART/shards/real/test" \
        --n 300 --autoattack "$version" --fast-targets "$TARGETS" --fast-iters "$ITERS" --eps "$EPS" \
        --pgd-steps 20 --pgd-restarts 2 --name "$variant" --out "$ART/aa-$version/$key.json")
      publish "$WT/$ART/aa-$version/$key.json" "$dst"
    done
  done
fi
echo "$NAME: $(ls "results/$NAME"/*/seed*.json 2>/dev/null | wc -l) runs with results"

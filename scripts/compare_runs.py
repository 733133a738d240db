"""Do two pipeline runs differ beyond wall-clock fields? ``python scripts/compare_runs.py A B``
compares artifact trees A and B (e.g. two `dvc repro` of the quick profile by two versions of
the code): every file byte-equal, or equal after removing timing and memory fields (JSON keys
with second/time/per_s/rss, such columns of log.tsv, report.md's train-time column), with
state.safetensors compared tensor by tensor. Prints the files that differ beyond that; exit 1
if any. Used to show that a refactor changed no output (README, "Layout")."""
import json
import sys
from pathlib import Path

import numpy as np

TIMING = ("second", "time", "timing", "per_s", "rss")  # wall clock and memory: differ between any two runs

def strip(o):
    if isinstance(o, dict):
        return {k: strip(v) for k, v in o.items() if not any(t in k for t in TIMING)}
    if isinstance(o, list):
        return [strip(v) for v in o]
    return o

def tsv(text):
    rows = [r.split("\t") for r in text.strip().splitlines()]
    keep = [i for i, c in enumerate(rows[0]) if not any(t in c for t in TIMING)]
    return [[r[i] for i in keep] for r in rows]

a, b = Path(sys.argv[1]), Path(sys.argv[2])
bad = []
for f in sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file()):
    x, y = (a / f).read_bytes(), (b / f).read_bytes() if (b / f).exists() else None
    if x == y:
        continue
    if y is None:
        bad.append(f"{f}: missing")
        continue
    if f.suffix == ".json":
        ok = strip(json.loads(x)) == strip(json.loads(y))
    elif f.suffix == ".tsv":
        ok = tsv(x.decode()) == tsv(y.decode())
    elif f.suffix == ".safetensors":
        from safetensors import safe_open
        from safetensors.numpy import load
        ta, tb = load(x), load(y)
        ok = ta.keys() == tb.keys() and all(np.array_equal(ta[k], tb[k]) for k in ta)
        with safe_open(str(a / f), "np") as fa, safe_open(str(b / f), "np") as fb:
            ma, mb = fa.metadata(), fb.metadata()
        ok = ok and {k: strip(json.loads(v)) for k, v in ma.items() if k != "cache_digest"} == \
            {k: strip(json.loads(v)) for k, v in mb.items() if k != "cache_digest"} and ma.get("cache_digest") == mb.get("cache_digest")
    elif f.suffix == ".md":  # the report: drop its train-time column
        def rows(t):
            lines = [r.split("|") for r in t.decode().splitlines()]
            head = next((r for r in lines if "train time (s)" in "|".join(r)), None)
            col = head.index(next(c for c in head if "train time" in c)) if head else None
            return [[c for i, c in enumerate(r) if i != col or len(r) != len(head)] for r in lines]
        ok = rows(x) == rows(y)
    else:
        ok = False
    if not ok:
        bad.append(str(f))
print("differ beyond timing:", bad if bad else "none")
sys.exit(1 if bad else 0)

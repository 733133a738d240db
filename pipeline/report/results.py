"""Reading what `evaluate` and `train` wrote, for the report: result JSONs and per-epoch logs.

Readers are defensive on purpose: a report over a folder of results should skip a stray file
with a one-line note, not fail, and should read a training log whatever its delimiter.
"""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

# the paper's variants, in the order the table shows them
CANONICAL = ["AT", "AT+DRA", "DM-AT", "DM-AT+DRA"]
TRAIN_TIME_KEYS = ("train_seconds", "seconds", "train_time", "time_s", "wall_s", "elapsed_s")
LOG_NAMES = ("log.tsv", "log.csv", "metrics.tsv", "log.jsonl")


def load_evals(folder: str | Path) -> list[dict]:
    """Every evaluation result (*.json with numeric clean and pgd) under folder, recursively."""
    runs = []
    for path in sorted(Path(folder).rglob("*.json")):
        if path.name.endswith(".metrics.json"):
            continue
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            print(f"note: skipping unreadable {path}")
            continue
        if isinstance(data, dict) and is_number(data.get("clean")) and is_number(data.get("pgd")):
            data.setdefault("variant", path.stem)
            data["_path"] = str(path)
            runs.append(data)
    return runs


def is_number(v: object) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def train_field(run: dict, name: str, default: object = None) -> object:
    """A field of the training config recorded in the checkpoint (flat or nested under train)."""
    cfg = run.get("train_config") or {}
    for scope in (cfg, cfg.get("train") or {}, cfg.get("config") or {}):
        if isinstance(scope, dict) and name in scope:
            return scope[name]
    return default


def aggregate(runs: list[dict]) -> dict[str, list[dict]]:
    """variant name -> its runs (one per seed), sorted by training seed."""
    groups: dict[str, list[dict]] = {}
    for r in runs:
        groups.setdefault(str(r["variant"]), []).append(r)
    for rs in groups.values():
        rs.sort(key=lambda r: (str(train_field(r, "seed", 0)), r["_path"]))
    return groups


def variant_order(name: str) -> tuple[int, str]:
    return (CANONICAL.index(name) if name in CANONICAL else len(CANONICAL), name)


def train_seconds(run: dict) -> float | None:
    """Wall time of training, from the metrics.json the train stage wrote (None if unknown)."""
    metrics = run.get("train_metrics") or {}
    for key in TRAIN_TIME_KEYS:
        if is_number(metrics.get(key)):
            return float(metrics[key])
    return None


def budget(run: dict) -> dict | None:
    """The run's training budget (steps, samples, real_samples, synthetic_samples); None if not recorded."""
    b = (run.get("train_metrics") or {}).get("budget")
    keys = ("steps", "samples", "real_samples", "synthetic_samples")
    if not isinstance(b, dict) or not all(is_number(b.get(k)) for k in keys):
        return None
    return {k: int(b[k]) for k in keys}


def unequal_budgets(groups: dict[str, list[dict]]) -> list[str]:
    """Variants with a run whose optimizer steps or samples seen differ from the most common budget.

    The real:synthetic split of the samples is what distinguishes DM-AT from AT, so it may differ;
    the number of steps and of samples may not (or one variant simply trained longer).
    """
    def key(r: dict) -> tuple[int, int] | None:
        b = budget(r)
        return None if b is None else (b["steps"], b["samples"])

    per_run = [(name, key(r)) for name, rs in groups.items() for r in rs]
    known = [k for _, k in per_run if k is not None]
    if not known:  # nothing recorded (runs of an older version): nothing to compare, see budgets_unknown
        return []
    common = max(set(known), key=known.count)
    return sorted({name for name, k in per_run if k != common})


def budgets_unknown(groups: dict[str, list[dict]]) -> bool:
    """No run records its budget: the report cannot check that the comparison is fair."""
    return all(budget(r) is None for rs in groups.values() for r in rs)


def find_train_log(run: dict, train_root: str | Path = "") -> Path | None:
    """The per-epoch log next to the run's checkpoint (or under train_root/VARIANT)."""
    folders = [Path(run["checkpoint"])] if run.get("checkpoint") else []
    if train_root:
        folders.append(Path(train_root) / str(run["variant"]))
    for folder in folders:
        for name in LOG_NAMES:
            if (folder / name).is_file():
                return folder / name
        tsvs = sorted((folder / "plots").glob("*.tsv")) if (folder / "plots").is_dir() else []
        if tsvs:
            return tsvs[0]
    return None


def read_log(path: str | Path) -> dict[str, list[float]]:
    """Columns of a TSV/CSV (header row) or JSON-lines log; non-numeric columns dropped."""
    path = Path(path)
    try:
        if path.suffix == ".jsonl":
            rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
        else:
            with open(path, newline="") as fh:
                rows = list(csv.DictReader(fh, delimiter="\t" if path.suffix == ".tsv" else ","))
    except (OSError, json.JSONDecodeError, csv.Error):
        print(f"note: skipping unreadable log {path}")
        return {}
    cols: dict[str, list[float]] = {}
    for key in (rows[0].keys() if rows else []):
        try:
            cols[key] = [float(r[key]) for r in rows]
        except (TypeError, ValueError, KeyError):
            continue
    return cols

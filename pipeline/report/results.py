"""Reading what `evaluate` and `train` wrote, for the report: result JSONs and per-epoch logs.

Readers are defensive on purpose: a report over a folder of results should skip a stray file
with a one-line note, not fail, and should read a training log whatever its delimiter.

What may share one table (checked here; the report refuses the rest in one line): rows trained at
one budget, rows evaluated alike, and evaluations that still measure the run their training
folder holds now.

Evaluation settings, in the order a difference is reported: threat model, eps, the PGD attack
(steps, restarts, step size, loss, random start), the AutoAttack version and its fast subset
(target classes, iterations), the attacks run, and the test images (n, offset, and the shard set:
its content hash where every row records one, ``shards_content_hash``, else the shards path). The
evaluation's own seed (PGD random starts) is not a setting: two seeds are two draws of the same
evaluation.

Staleness: an evaluation JSON records the training folder's ``config.json`` (``train_config``: its
``progress``, global step and wall seconds of the last checkpoint, and ``finished``) and
``metrics.json`` (``train_metrics``: ``train_seconds``) as they were when it ran. A folder trained
again (or further) since records other values, so the evaluation measured weights that are gone.
Where the evaluation records the sha256 of the weights it loaded (``checkpoint_sha256``), that is
compared with the folder's ``model.safetensors`` instead.
"""

from __future__ import annotations

import csv
import json
import math
import os
from pathlib import Path

from pipeline.core.errors import UserError
from pipeline.core.shards import file_sha256

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


def upstream(run: dict) -> str | None:
    """The diffusion model the run's cache was extracted with (its weights' sha256): the upstream.
    Runs of one comparison may train on different caches of one upstream (a K-views ablation
    compares caches), never on caches of different diffusion models."""
    cache = (run.get("train_config") or {}).get("cache")
    model = cache.get("model") if isinstance(cache, dict) else None
    sha = model.get("weights_sha256") if isinstance(model, dict) else None
    return sha if isinstance(sha, str) else None


# what two runs of one seed must share to be a pair: (label, how to read it); a field a run does not
# record (results from before it was recorded) is not checked for that pair
def order_rule(run: dict) -> tuple | None:
    """How the run ordered its real samples: (mode, window, the real part's rows per chunk). The
    synthetic part's order is not compared: DM-AT against AT differs in the mix by design."""
    order = train_field(run, "order")
    if not isinstance(order, dict):
        return None
    chunks = order.get("rows_per_chunk")
    return order.get("mode"), order.get("window"), chunks.get("train") if isinstance(chunks, dict) else chunks


PAIRED_FIELDS = (("sample order", order_rule), ("upstream (diffusion model)", upstream),
                 ("training eps", lambda r: train_field(r, "eps")),
                 ("training attack steps", lambda r: train_field(r, "attack_steps")),
                 ("training attack step size", lambda r: train_field(r, "step_size")))


def seed_pairs(groups: dict[str, list[dict]], name: str, base: str) -> list[tuple[str, dict, dict]]:
    """(seed, variant's run, base's run) for every training seed both variants ran, in seed order."""
    mine, ref = ({str(train_field(r, "seed", "?")): r for r in groups[g]} for g in (name, base))
    return [(seed, mine[seed], ref[seed]) for seed in sorted(set(mine) & set(ref))]


def refuse_unpaired(groups: dict[str, list[dict]], pairs: list[tuple[str, str]]) -> None:
    """Each (variant, base) pair's runs of one seed must share the sample order, the cache, and the
    training attack's eps, steps and step size (the evaluation settings are checked for the whole
    table by ``refuse_unequal_evaluations``); one error line names the runs and the field otherwise."""
    for name, base in pairs:
        for seed, a, b in seed_pairs(groups, name, base):
            for label, read in PAIRED_FIELDS:
                x, y = read(a), read(b)
                if x is not None and y is not None and x != y:
                    raise UserError(f"{name} and {base} of seed {seed} ({a['_path']}, {b['_path']}) differ in "
                                    f"{label} ({str(x)[:40]} vs {str(y)[:40]}): not a paired comparison")


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


def run_folder(run: dict, train_root: str | Path) -> Path | None:
    """The training folder of an evaluated run under ``train_root``: the checkpoint folder the
    evaluation read, if it lies there, else ``train_root/VARIANT``; None without ``train_root`` or
    when neither exists (results evaluated elsewhere)."""
    if not train_root:
        return None
    root = Path(train_root).resolve()
    folders = []
    if run.get("checkpoint"):
        ckpt = Path(str(run["checkpoint"])).resolve()
        if ckpt == root or root in ckpt.parents:
            folders.append(ckpt)
    folders.append(Path(train_root) / str(run["variant"]))
    return next((f for f in folders if f.is_dir()), None)


def find_train_log(run: dict, train_root: str | Path = "") -> Path | None:
    """The per-epoch log in the run's training folder (``run_folder``); None without --train."""
    folder = run_folder(run, train_root)
    if folder is None:
        return None
    for name in LOG_NAMES:
        if (folder / name).is_file():
            return folder / name
    tsvs = sorted((folder / "plots").glob("*.tsv")) if (folder / "plots").is_dir() else []
    return tsvs[0] if tsvs else None


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


# --- evaluation settings every row shares, and evaluations older than their run ---------------

HASH_FIELD = "shards_content_hash"  # the test split's content hash, where the evaluation records it
WEIGHTS_FIELD = "checkpoint_sha256"  # sha256 of the model.safetensors evaluated, where recorded
WEIGHTS_FILE = "model.safetensors"


def _num(v: object) -> object:
    """A float as a comparable key: 0.1 and 0.1000000000000001 are one eps."""
    return float(f"{v:.12g}") if is_number(v) else v


def eval_settings(run: dict, *, by_hash: bool = False) -> dict[str, object]:
    """The run's evaluation settings, name -> value, in the order a difference is reported."""
    pgd = run.get("pgd_attack") if isinstance(run.get("pgd_attack"), dict) else {}
    version = run.get("autoattack_version")
    fast = run.get("autoattack_fast") if version == "fast" and isinstance(run.get("autoattack_fast"), dict) else {}
    shards = run.get(HASH_FIELD) if by_hash else run.get("shards")
    if not by_hash and isinstance(shards, str):
        shards = os.path.normpath(os.path.abspath(shards))
    return {
        "threat model": run.get("threat_model", "Linf"),
        "eps": _num(run.get("eps")),
        "PGD steps": pgd.get("steps"),
        "PGD restarts": pgd.get("restarts"),
        "PGD step size": _num(pgd.get("step_size")),
        "PGD loss": pgd.get("loss", "ce"),
        "PGD random start": pgd.get("random_start", True),
        "AutoAttack version": version,
        "AutoAttack-fast target classes": fast.get("targets"),
        "AutoAttack-fast iterations": fast.get("iters"),
        "attacks": ", ".join(map(str, run.get("attacks") or [])),
        "test images (n)": run.get("n"),
        "AutoAttack images": run.get("autoattack_n") or run.get("n") if version not in (None, "none") else None,
        "test images (offset)": run.get("offset") or 0,
        "test shards (content hash)" if by_hash else "test shards": shards,
    }


def _key(s: dict) -> str:
    return json.dumps(s, sort_keys=True, default=str)


def row_name(run: dict) -> str:
    return f"{run['variant']} seed {train_field(run, 'seed', '?')} ({run['_path']})"


def compare(groups: dict[str, list[dict]]) -> tuple[dict[str, object], list[tuple[dict, str, object, object]]]:
    """(the common settings, the runs that differ from them): the settings most rows share (ties:
    the first row's), and for every other run (in table order) its first differing setting, its
    value and the common one."""
    runs = [r for rs in groups.values() for r in rs]
    by_hash = all(isinstance(r.get(HASH_FIELD), str) and r[HASH_FIELD] for r in runs)
    each = [eval_settings(r, by_hash=by_hash) for r in runs]
    keys = [_key(s) for s in each]
    common_key = max(keys, key=keys.count)  # max keeps the first of equal counts: table order
    common = each[keys.index(common_key)]
    odd = []
    for r, s, k in zip(runs, each, keys):
        if k != common_key:
            name = next(n for n in s if s[n] != common[n])
            odd.append((r, name, s[name], common[name]))
    return common, odd


def show(value: object) -> str:
    return "none" if value is None else f"{value:g}" if isinstance(value, float) else str(value)


def difference(name: str, theirs: object, common: object) -> str:
    """'eps 0.05, the others 0.1'."""
    return f"{name} {show(theirs)}, the others {show(common)}"


def unequal_evaluations(groups: dict[str, list[dict]]) -> dict[str, str]:
    """variant -> the first setting in which one of its runs was evaluated differently from the rest."""
    marked: dict[str, str] = {}
    for r, name, theirs, common in compare(groups)[1]:
        marked.setdefault(str(r["variant"]), difference(name, theirs, common))
    return marked


def refuse_unequal_evaluations(groups: dict[str, list[dict]], hint: str) -> None:
    """One line naming two rows evaluated differently and their first differing setting."""
    common, odd = compare(groups)
    if not odd:
        return
    r, name, theirs, value = odd[0]
    ref = next(x for rs in groups.values() for x in rs if x not in [o[0] for o in odd])
    more = {0: "", 1: " (1 more row differs)"}.get(len(odd) - 1, f" ({len(odd) - 1} more rows differ)")
    raise UserError(f"evaluation settings differ: {row_name(r)} has {name} {show(theirs)}, {row_name(ref)} "
                    f"{show(value)}{more}; {hint}")


def pgd_label(common: dict) -> str:
    steps, restarts = (common[k] if common[k] is not None else "?" for k in ("PGD steps", "PGD restarts"))
    return f"PGD-{steps}x{restarts}"


def aa_label(common: dict) -> str:
    return f"AutoAttack-{common['AutoAttack version'] or '?'}"


def _json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _sha256(path: Path) -> str | None:
    """The file's sha256 (``core.shards.file_sha256``), None where it cannot be read."""
    try:
        return file_sha256(path)
    except OSError:
        return None


def _progress(p: object) -> str:
    if not isinstance(p, dict):
        return "none"
    seconds = p.get("seconds")
    return f"step {p.get('global_step', '?')} after {seconds:.1f} s" if is_number(seconds) else \
        f"step {p.get('global_step', '?')}"


def stale(run: dict, folder: Path) -> str | None:
    """Why the evaluation measured another training than ``folder`` holds now, or None (the same
    one, or nothing to compare: the folder holds no run, the evaluation records nothing of it)."""
    config = _json(folder / "config.json")
    if config is None:  # not a run folder (or an unreadable one): nothing it could be older than
        return None
    recorded = run.get(WEIGHTS_FIELD)
    if isinstance(recorded, str) and recorded:
        now = _sha256(folder / WEIGHTS_FILE)
        return None if now == recorded else f"its {WEIGHTS_FILE} had sha256 {recorded[:12]}..., now {str(now)[:12]}..."
    then = run.get("train_config")
    if not isinstance(then, dict):
        return None
    if then.get("progress") != config.get("progress"):
        return (f"its config.json recorded {_progress(then.get('progress'))} then, "
                f"{_progress(config.get('progress'))} now")
    if then.get("finished") != config.get("finished"):
        return f"it was {'finished' if then.get('finished') else 'unfinished'} then, " \
               f"{'finished' if config.get('finished') else 'unfinished'} now"
    then_s = (run.get("train_metrics") or {}).get("train_seconds")
    now_s = (_json(folder / "metrics.json") or {}).get("train_seconds")
    if then_s != now_s:
        return f"its metrics.json recorded train_seconds {then_s} then, {now_s} now"
    return None


def refuse_stale(runs: list[dict], train_root: str | Path) -> None:
    """One line naming the first evaluation older than the training in its folder under ``train_root``."""
    found = [(r, f, why) for r in runs if (f := run_folder(r, train_root)) and (why := stale(r, f))]
    if found:
        r, folder, why = found[0]
        more = f" ({len(found) - 1} more)" if len(found) > 1 else ""
        raise UserError(f"{r['_path']} is older than the run it measured: {folder} was trained again since "
                        f"({why}){more}; evaluate it again, or pass --train '' to report without the training "
                        "folders (and their curves)")

"""Stage `report`: evaluation JSONs + training logs -> Markdown table and PNG plots.

The table answers the project's question per variant (AT, AT+DRA, DM-AT, DM-AT+DRA): clean,
PGD and AutoAttack accuracy and training time, as mean +- std over the seeds that ran (airbench
style: a single run is shown without +-). The sanity checks of every evaluation are carried
into the table, so a number from a masked-gradient model cannot pass unnoticed.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline import storage
from pipeline.config import ReportConfig
from pipeline.errors import UserError, check_out
from pipeline.results import (
    aggregate,
    find_train_log,
    load_evals,
    read_log,
    train_field,
    train_seconds,
    variant_order,
)


def fmt(values: list[float], scale: float = 100.0, digits: int = 2) -> str:
    """'85.30' for one value, '85.30 ± 0.41' (sample std) for several, '-' for none."""
    vals = [v * scale for v in values if v is not None]
    if not vals:
        return "-"
    mean = sum(vals) / len(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    std = (sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) ** 0.5
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def table(groups: dict[str, list[dict]]) -> str:
    """The Markdown results table, one row per variant."""
    first = next(iter(groups.values()))[0]
    pgd = first.get("pgd_attack", {})
    head = (f"| variant | seeds | DRA weight | synthetic | clean (%) "
            f"| PGD-{pgd.get('steps', '?')}x{pgd.get('restarts', '?')} (%) "
            f"| AutoAttack-{first.get('autoattack_version', '?')} (%) | train time (s) | checks |")
    rows = [head, "|" + "---|" * 9]
    for name, runs in groups.items():
        bad = sorted({w for r in runs for w in r.get("warnings", [])})
        setting = [", ".join(sorted({f"{train_field(r, k, '?')}" for r in runs}))
                   for k in ("dra_weight", "synthetic_fraction")]
        rows.append(f"| {name} | {len(runs)} | {setting[0]} | {setting[1]} | {fmt([r['clean'] for r in runs])} "
                    f"| {fmt([r['pgd'] for r in runs])} | {fmt([r.get('autoattack') for r in runs])} "
                    f"| {fmt([train_seconds(r) for r in runs], scale=1.0, digits=0)} "
                    f"| {'ok' if not bad else 'FAILED: ' + ', '.join(bad)} |")
    return "\n".join(rows)


def markdown(groups: dict[str, list[dict]], images: list[str]) -> str:
    first = next(iter(groups.values()))[0]
    ns = sorted({r["n"] for runs in groups.values() for r in runs})
    lines = [
        "# Results", "",
        f"Threat model {first.get('threat_model', 'Linf')}, eps = {first.get('eps')}, on the first "
        f"{'/'.join(map(str, ns))} test images; accuracies of the EMA weights. "
        "Mean ± sample std over seeds where several ran.", "",
        table(groups), "",
        "Attacks: " + ", ".join(first.get("attacks", [])) + ".", "",
    ]
    fast = first.get("autoattack_fast")
    if fast:
        lines += [f"AutoAttack-fast is APGD-CE (1 restart) + APGD-T ({fast.get('targets')} target classes), "
                  f"{fast.get('iters')} iterations each: a cheaper subset of standard AutoAttack, so its "
                  "accuracy is an upper bound on standard AutoAttack's.", ""]
    lines += [f"![{Path(p).stem}]({p})\n" for p in images]
    return "\n".join(lines)


def run(cfg: ReportConfig) -> dict:
    check_out(cfg.out, folder=True)
    runs = load_evals(cfg.evals)
    if not runs:
        raise UserError(f"{cfg.evals}: no evaluation results (*.json with clean/pgd accuracies); "
                        "run `evaluate` first")
    groups = {k: v for k, v in sorted(aggregate(runs).items(), key=lambda kv: variant_order(kv[0]))}
    out = Path(cfg.out)
    tmp = Path(storage.start(out))
    from pipeline import plots  # matplotlib is slow to import; keep it out of --help

    images = [plots.accuracy_bars(groups, tmp / "accuracy.png")]
    logs = {name: [read_log(p) for r in rs if (p := find_train_log(r, cfg.train))] for name, rs in groups.items()}
    if any(logs.values()):
        images.append(plots.training_curves(logs, tmp / "curves.png"))
    if cfg.grid and Path(cfg.grid).is_file():
        shutil.copyfile(cfg.grid, tmp / "samples.png")
        images.append(tmp / "samples.png")
    (tmp / "report.md").write_text(markdown(groups, [p.name for p in images]))
    summary = {name: [{k: r.get(k) for k in ("clean", "pgd", "autoattack", "seed", "checkpoint")}
                      | {"train_seconds": train_seconds(r)} for r in rs] for name, rs in groups.items()}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    storage.commit(str(tmp), out)
    print(table(groups))
    print(f"report: {out / 'report.md'}")
    return summary

"""Stage `report`: evaluation JSONs + training logs -> Markdown table and PNG plots.

The table answers the project's question per variant (AT, AT+DRA, DM-AT, DM-AT+DRA): clean,
PGD and AutoAttack accuracy and training time, as mean +- std over the seeds that ran (airbench
style: a single run is shown without +-). The sanity checks of every evaluation are carried
into the table, so a number from a masked-gradient model cannot pass unnoticed.

Variants are compared only at one training budget: every row shows its optimizer steps and the
samples seen (real + synthetic), and rows whose budgets differ are refused (``--allow-unequal-budgets``
shows them, each marked UNEQUAL BUDGET, under a warning).

``--readme FILE`` also writes the table into FILE between the lines ``<!-- report:begin -->`` and
``<!-- report:end -->``; ``--readme FILE#NAME`` between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` (the README's results tables are generated from committed result JSONs,
never typed by hand).
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
    budget,
    budgets_unknown,
    find_train_log,
    load_evals,
    read_log,
    train_field,
    train_seconds,
    unequal_budgets,
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


def _budget_cell(runs: list[dict]) -> tuple[str, str]:
    """'steps' and 'real + synthetic samples' of a variant's runs ('?' if not recorded)."""
    seen = {None if b is None else (b["steps"], b["real_samples"], b["synthetic_samples"])
            for b in map(budget, runs)}
    cells = [("?", "?") if b is None else (f"{b[0]}", f"{b[1]} + {b[2]}") for b in sorted(seen, key=str)]
    return " / ".join(c[0] for c in cells), " / ".join(c[1] for c in cells)


def table(groups: dict[str, list[dict]], unequal: list[str] = ()) -> str:
    """The Markdown results table, one row per variant."""
    first = next(iter(groups.values()))[0]
    pgd = first.get("pgd_attack", {})
    head = (f"| variant | seeds | DRA weight | synthetic | steps | samples (real + syn) | clean (%) "
            f"| PGD-{pgd.get('steps', '?')}x{pgd.get('restarts', '?')} (%) "
            f"| AutoAttack-{first.get('autoattack_version', '?')} (%) | train time (s) | checks |")
    rows = [head, "|" + "---|" * 11]
    for name, runs in groups.items():
        bad = sorted({w for r in runs for w in r.get("warnings", [])})
        setting = [", ".join(sorted({f"{train_field(r, k, '?')}" for r in runs}))
                   for k in ("dra_weight", "synthetic_fraction")]
        steps, samples = _budget_cell(runs)
        flag = " UNEQUAL BUDGET" if name in unequal else ""
        rows.append(f"| {name}{flag} | {len(runs)} | {setting[0]} | {setting[1]} | {steps} | {samples} "
                    f"| {fmt([r['clean'] for r in runs])} "
                    f"| {fmt([r['pgd'] for r in runs])} | {fmt([r.get('autoattack') for r in runs])} "
                    f"| {fmt([train_seconds(r) for r in runs], scale=1.0, digits=0)} "
                    f"| {'ok' if not bad else 'FAILED: ' + ', '.join(bad)} |")
    return "\n".join(rows)


def markdown(groups: dict[str, list[dict]], images: list[str], unequal: list[str] = ()) -> str:
    first = next(iter(groups.values()))[0]
    ns = sorted({r["n"] for runs in groups.values() for r in runs})
    unknown = budgets_unknown(groups)
    fair = ("" if unequal or unknown else
            " Every variant trained for the same optimizer steps on the same number of samples (steps x "
            "batch; an epoch is ceil(N_real / batch) steps whatever the real:synthetic mix, the DM-AT convention).")
    lines = [
        "# Results", "",
        f"Threat model {first.get('threat_model', 'Linf')}, eps = {first.get('eps')}, on the first "
        f"{'/'.join(map(str, ns))} test images; accuracies of the EMA weights. "
        f"Mean ± sample std over seeds where several ran.{fair}", "",
    ]
    if unknown:
        lines += ["**WARNING: no run records its training budget (trained by an older version): the rows "
                  "may not be a fair comparison.**", ""]
    if unequal:
        lines += [f"**WARNING: the training budgets differ ({', '.join(unequal)}): these rows are not a fair "
                  "comparison with the others.**", ""]
    lines += [
        table(groups, unequal), "",
        "Attacks: " + ", ".join(first.get("attacks", [])) + ".", "",
    ]
    fast = first.get("autoattack_fast")
    if fast:
        lines += [f"AutoAttack-fast is APGD-CE (1 restart) + APGD-T ({fast.get('targets')} target classes), "
                  f"{fast.get('iters')} iterations each, every APGD schedule set for that iteration count: a "
                  "cheaper subset of standard AutoAttack, so its accuracy is an expected upper bound on "
                  "standard AutoAttack's.", ""]
    lines += [f"![{Path(p).stem}]({p})\n" for p in images]
    return "\n".join(lines)


SIGNATURE = ("report.md",)  # the file that marks a finished output folder of this stage
def markers(spec: str) -> tuple[Path, str, str]:
    """``FILE`` or ``FILE#NAME`` -> (file, begin marker, end marker); NAME defaults to ``report``."""
    path, _, name = spec.partition("#")
    name = name or "report"
    return Path(path), f"<!-- {name}:begin -->", f"<!-- {name}:end -->"


def readme_parts(spec: str) -> tuple[str, str]:
    """The text of the file before the begin and after the end marker (each once, in order)."""
    path, begin, end = markers(spec)
    if not path.is_file():
        raise UserError(f"--readme {path}: no such file")
    text = path.read_text()
    if text.count(begin) != 1 or text.count(end) != 1 or text.index(begin) > text.index(end):
        raise UserError(f"{path}: needs one line {begin} and, after it, one line {end} around the table")
    head, rest = text.split(begin, 1)
    return head, rest.split(end, 1)[1]


def write_readme_block(spec: str, parts: tuple[str, str], table_md: str, evals: str) -> None:
    """Replace what lies between the marker lines of the file with the results table."""
    path, begin, end = markers(spec)
    block = (f"{begin}\n<!-- generated by `python -m pipeline report --evals {evals} --readme {spec}` "
             f"from {evals}/*.json: do not edit by hand -->\n{table_md}\n{end}")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(parts[0] + block + parts[1])
    tmp.rename(path)


def run(cfg: ReportConfig) -> dict:
    check_out(cfg.out, folder=True)
    storage.refuse_foreign(cfg.out, SIGNATURE)
    readme = readme_parts(cfg.readme) if cfg.readme else None
    runs = load_evals(cfg.evals)
    if not runs:
        raise UserError(f"{cfg.evals}: no evaluation results (*.json with clean/pgd accuracies); "
                        "run `evaluate` first")
    groups = {k: v for k, v in sorted(aggregate(runs).items(), key=lambda kv: variant_order(kv[0]))}
    unequal = unequal_budgets(groups)
    if unequal and not cfg.allow_unequal_budgets:
        raise UserError(f"training budgets (steps, real and synthetic samples) differ between variants "
                        f"({', '.join(unequal)} differ from the others): retrain them at one budget, or pass "
                        "--allow-unequal-budgets to show them marked")
    out = Path(cfg.out)
    tmp = Path(storage.start(out, signature=SIGNATURE))
    from pipeline import plots  # matplotlib is slow to import; keep it out of --help

    images = [plots.accuracy_bars(groups, tmp / "accuracy.png")]
    logs = {name: [read_log(p) for r in rs if (p := find_train_log(r, cfg.train))] for name, rs in groups.items()}
    if any(logs.values()):
        images.append(plots.training_curves(logs, tmp / "curves.png"))
    if cfg.grid and Path(cfg.grid).is_file():
        shutil.copyfile(cfg.grid, tmp / "samples.png")
        images.append(tmp / "samples.png")
    (tmp / "report.md").write_text(markdown(groups, [p.name for p in images], unequal))
    summary = {name: [{k: r.get(k) for k in ("clean", "pgd", "autoattack", "seed", "checkpoint")}
                      | {"train_seconds": train_seconds(r), "budget": (r.get("train_metrics") or {}).get("budget")}
                      for r in rs] for name, rs in groups.items()}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    storage.commit(str(tmp), out, signature=SIGNATURE)
    if readme is not None:
        write_readme_block(cfg.readme, readme, table(groups, unequal), cfg.evals)
    print(table(groups, unequal))
    print(f"report: {out / 'report.md'}")
    return summary

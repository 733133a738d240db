"""Stage `report`: evaluation JSONs + training logs -> Markdown table and PNG plots.

The table answers the project's question per variant (AT, AT+DRA, DM-AT, DM-AT+DRA): clean,
PGD and AutoAttack accuracy and training time, as mean +- std over the seeds that ran (airbench
style: a single run is shown without +-). The sanity checks of every evaluation are carried
into the table, so a number from a masked-gradient model cannot pass unnoticed.

Variants are compared only at one training budget and one evaluation: every row shows its optimizer
steps and the samples seen (real + synthetic), and rows whose budgets differ are refused
(``--allow-unequal-budgets`` shows them, each marked UNEQUAL BUDGET, under a warning); so are rows
evaluated under other settings (threat model, eps, the attacks and their steps, restarts and step
size, AutoAttack version and fast subset, test images: pipeline/report/results.py), in one line
naming two such rows and their first differing setting (``--allow-unequal-evaluations`` shows them
marked UNEQUAL EVALUATION). The attack columns are named from the settings the rows share. With
``--train``, an evaluation older than the run its training folder holds now (trained again since)
is refused. Where variants share two or more training seeds, a second table gives each variant
minus the baseline (``--baseline``, default the first row; or ``--baseline
AT+DRA:AT,DM-AT+DRA:DM-AT``, each variant minus its own base), paired by seed: the mean difference
with its 95% Student-t interval, marked "within noise" when the interval contains 0, and the seeds
where the variant is higher, and the smallest PGD difference those seeds detect with 80% power; an
item ``A:B/C:D`` adds the interaction (A − B) − (C − D). ``--curves DIR`` reports per-epoch
validation logs instead (pipeline/report/curves.py).

``--sweep runs.json`` renders the DRA sweep instead (pipeline/report/sweep.py), ``--bench
bench.json`` the benchmark's figures against the design's performance targets (docs/benchmarks.md) (pipeline/bench/figures.py), and
``--aa-standard DIR`` how far the AutoAttack-fast results in ``--evals`` are from standard
AutoAttack on the same runs and images in DIR (pipeline/report/autoattack.py).

``--readme FILE`` also writes the table into FILE between the lines ``<!-- report:begin -->`` and
``<!-- report:end -->``; ``--readme FILE#NAME`` between ``<!-- NAME:begin -->`` and
``<!-- NAME:end -->`` (the README's results tables are generated from committed result JSONs,
never typed by hand).
"""


from __future__ import annotations

import json
import shutil
from pathlib import Path

from pipeline.bench import figures
from pipeline.core import storage
from pipeline.core.errors import UserError, check_out
from pipeline.report import autoattack, curves, generator, model_card, sweep
from pipeline.report.config import ReportConfig
from pipeline.report.results import (
    aggregate,
    find_train_log,
    load_evals,
    read_log,
    refuse_stale,
    refuse_unequal_evaluations,
    refuse_unpaired,
    train_seconds,
    unequal_budgets,
    variant_order,
)
from pipeline.report.tables import (
    comparisons,
    interactions,
    markdown,
    readme_parts,
    results_block,
    write_readme_block,
)

SIGNATURE = ("report.md",)  # the file that marks a finished output folder of this stage


def _read_json(path: str, what: str) -> object:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:  # ValueError: bad JSON or not UTF-8
        raise UserError(f"{what} {path}: not a readable JSON file ({type(exc).__name__})") from None


def sweep_report(cfg: ReportConfig, readme: tuple[str, str] | None) -> dict:
    """``--sweep runs.json``: the DRA sweep's table and t x lambda heatmaps (pipeline/report/sweep.py)."""
    runs = sweep.check_runs(_read_json(cfg.sweep, "--sweep"))
    probe = _read_json(cfg.probe, "--probe") if cfg.probe else None
    tmp = Path(storage.start(Path(cfg.out), signature=SIGNATURE))
    image = sweep.heatmaps(runs, probe if isinstance(probe, dict) else None, tmp / "sweep.png")
    text = sweep.markdown(runs, probe if isinstance(probe, dict) else None)
    options = f"--sweep {cfg.sweep}{f' --probe {cfg.probe}' if cfg.probe else ''} --out {cfg.out}"
    _finish(cfg, readme, tmp, f"# DRA sweep\n\n{text}\n\n![sweep]({image.name})\n", text, options, cfg.sweep)
    return {"runs": len(runs)}


def _finish(cfg: ReportConfig, readme: tuple[str, str] | None, tmp: Path, page: str, text: str, options: str,
            source: str) -> None:
    """The report page into the started folder ``tmp``, committed to --out; ``text`` into the README
    block (``options``: the command's flags, ``source``: the data it came from) and to stdout."""
    (tmp / "report.md").write_text(page)
    storage.commit(str(tmp), Path(cfg.out), signature=SIGNATURE)
    if readme is not None:
        write_readme_block(cfg.readme, readme, text, options, source)
    print(text)
    print(f"report: {Path(cfg.out) / 'report.md'}")


def bench_report(cfg: ReportConfig, readme: tuple[str, str] | None) -> dict:
    """``--bench bench.json``: the benchmark's figures against the design's performance targets (docs/benchmarks.md) (pipeline/bench/figures.py)."""
    res = figures.check(_read_json(cfg.bench, "--bench"))
    text = figures.markdown(res)
    tmp = Path(storage.start(Path(cfg.out), signature=SIGNATURE))
    _finish(cfg, readme, tmp, f"# Benchmark\n\n{text}\n", text, f"--bench {cfg.bench} --out {cfg.out}", cfg.bench)
    return {"figures": sum(figures.measured(res, key) for _, key in figures.ROWS)}


def generator_report(cfg: ReportConfig, readme: tuple[str, str] | None) -> dict:
    """``--generator DIR``: one row per generate setting (DIR/NAME/generate.json; pipeline/report/generator.py)."""
    rows = generator.load(cfg.generator)
    text = generator.markdown(rows)
    tmp = Path(storage.start(Path(cfg.out), signature=SIGNATURE))
    _finish(cfg, readme, tmp, f"# Generator quality\n\n{text}\n", text, f"--generator {cfg.generator} --out {cfg.out}",
            f"{cfg.generator}/*/generate.json")
    return {"settings": len(rows)}


def curves_report(cfg: ReportConfig, readme: tuple[str, str] | None) -> dict:
    """``--curves DIR``: per-epoch validation, best against last epoch (pipeline/report/curves.py)."""
    groups = curves.load(cfg.curves)
    text = curves.markdown(groups, _read_json(cfg.probe, "--probe") if cfg.probe else None)
    tmp = Path(storage.start(Path(cfg.out), signature=SIGNATURE))
    image = curves.plot(groups, tmp / "curves.png")
    overfit = curves.overfit_plot(groups, tmp / "overfit.png")
    _finish(cfg, readme, tmp, f"# Validation curves\n\n{text}\n\n![curves]({image.name})\n\n![overfitting]({overfit.name})\n",
            text,
            f"--curves {cfg.curves}{f' --probe {cfg.probe}' if cfg.probe else ''} --out {cfg.out}",
            f"{cfg.curves}/*/log.tsv and seed*.tsv")
    return {"groups": len(groups)}


def card_report(cfg: ReportConfig, readme: tuple[str, str] | None) -> dict:
    """``--model-card EVAL.json``: the run's RobustBench model-card entry (pipeline/report/model_card.py)."""
    result = _read_json(cfg.model_card, "--model-card")
    if not isinstance(result, dict) or not {"clean", "eps", "n"} <= set(result):
        raise UserError(f"--model-card {cfg.model_card}: not an evaluate result (no clean/eps/n)")
    card = model_card.model_card(result, cfg.model_card)
    tmp = Path(storage.start(Path(cfg.out), signature=SIGNATURE))
    (tmp / "model_card.json").write_text(json.dumps(card, indent=2) + "\n")
    text = "\n".join(f"| {k} | {v} |" for k, v in card.items())
    _finish(cfg, readme, tmp, f"# RobustBench model card\n\n| field | value |\n|---|---|\n{text}\n", text,
            f"--model-card {cfg.model_card} --out {cfg.out}", cfg.model_card)
    return card


def aa_report(cfg: ReportConfig, readme: tuple[str, str] | None) -> dict:
    """``--aa-standard DIR``: AutoAttack-fast (--evals) against standard AutoAttack (DIR), run by run."""
    folders = {cfg.aa_standard: load_evals(cfg.aa_standard), cfg.evals: load_evals(cfg.evals)}
    for folder, runs in folders.items():
        if not runs:
            raise UserError(f"{folder}: no evaluation results (*.json with clean/pgd accuracies)")
    pairs = autoattack.pair_runs(folders[cfg.aa_standard], folders[cfg.evals], cfg.aa_standard, cfg.evals)
    for folder, runs in folders.items():  # one PGD and AutoAttack setting per column of the table
        refuse_unequal_evaluations(aggregate(runs), f"evaluate every run in {folder} alike")
    text = autoattack.markdown(pairs)
    tmp = Path(storage.start(Path(cfg.out), signature=SIGNATURE))
    _finish(cfg, readme, tmp, f"# AutoAttack: fast subset vs standard\n\n{text}\n", text,
            f"--evals {cfg.evals} --aa-standard {cfg.aa_standard} --out {cfg.out}",
            f"{cfg.aa_standard}/*.json and {cfg.evals}/*.json")
    return {"runs": len(pairs)}


def run(cfg: ReportConfig) -> dict:
    cfg.validate()
    check_out(cfg.out, folder=True)
    storage.refuse_foreign(cfg.out, SIGNATURE)
    readme = readme_parts(cfg.readme) if cfg.readme else None
    other = (cfg.sweep, cfg.bench, cfg.aa_standard, cfg.generator, cfg.model_card, cfg.curves)
    if sum(map(bool, other)) > 1:
        raise UserError("--sweep, --bench, --aa-standard, --generator, --model-card and --curves are different reports: give one")
    if any(other) and cfg.out == ReportConfig.out:
        raise UserError(f"--sweep/--bench/--aa-standard/--generator/--model-card/--curves: give --out (the default, "
                        f"{ReportConfig.out}, is the report stage's output)")
    if cfg.curves:
        return curves_report(cfg, readme)
    if cfg.generator:
        return generator_report(cfg, readme)
    if cfg.model_card:
        return card_report(cfg, readme)
    if cfg.sweep:
        return sweep_report(cfg, readme)
    if cfg.bench:
        return bench_report(cfg, readme)
    if cfg.aa_standard:
        return aa_report(cfg, readme)
    runs = load_evals(cfg.evals)
    if not runs:
        raise UserError(f"{cfg.evals}: no evaluation results (*.json with clean/pgd accuracies); "
                        "run `evaluate` first")
    groups = {k: v for k, v in sorted(aggregate(runs).items(), key=lambda kv: variant_order(kv[0]))}
    # refuses a variant that did not run, and runs of one seed that are not a pair, before any work
    refuse_unpaired(groups, comparisons(groups, cfg.baseline) + [
        p for a, b, c, d in interactions(groups, cfg.baseline) for p in ((a, b), (c, d))])
    baseline = cfg.baseline or next(iter(groups))
    unequal = unequal_budgets(groups)
    if unequal and not cfg.allow_unequal_budgets:
        raise UserError(f"training budgets (steps, real and synthetic samples) differ between variants "
                        f"({', '.join(unequal)} differ from the others): retrain them at one budget, or pass "
                        "--allow-unequal-budgets to show them marked")
    if not cfg.allow_unequal_evaluations:
        refuse_unequal_evaluations(groups, "evaluate them alike, or pass --allow-unequal-evaluations to show "
                                           "them marked")
    refuse_stale(runs, cfg.train)
    out = Path(cfg.out)
    tmp = Path(storage.start(out, signature=SIGNATURE))
    from pipeline.report import plots  # matplotlib is slow to import; keep it out of --help

    images = [plots.accuracy_bars(groups, tmp / "accuracy.png")]
    differences = plots.paired_differences(groups, comparisons(groups, baseline), tmp / "differences.png")
    images += [differences] if differences else []
    logs = {name: [read_log(p) for r in rs if (p := find_train_log(r, cfg.train))] for name, rs in groups.items()}
    if any(logs.values()):
        images.append(plots.training_curves(logs, tmp / "curves.png"))
    if cfg.grid and Path(cfg.grid).is_file():
        shutil.copyfile(cfg.grid, tmp / "samples.png")
        images.append(tmp / "samples.png")
    (tmp / "report.md").write_text(markdown(groups, [p.name for p in images], unequal, baseline))
    summary = {name: [{k: r.get(k) for k in ("clean", "pgd", "autoattack", "seed", "checkpoint")}
                      | {"train_seconds": train_seconds(r), "budget": (r.get("train_metrics") or {}).get("budget")}
                      for r in rs] for name, rs in groups.items()}
    (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    storage.commit(str(tmp), out, signature=SIGNATURE)
    if readme is not None:
        option = f" --baseline '{cfg.baseline}'" if cfg.baseline else ""
        write_readme_block(cfg.readme, readme, results_block(groups, unequal, baseline),
                           f"--evals {cfg.evals}{option}", f"{cfg.evals}/*.json")
    print(results_block(groups, unequal, baseline))
    print(f"report: {out / 'report.md'}")
    return summary

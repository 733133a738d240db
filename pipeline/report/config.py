"""Defaults of `report`."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import require


@dataclass(frozen=True)
class ReportConfig:
    evals: str = "artifacts/eval"  # folder of `evaluate` result JSONs, one per variant
    # folder of `train` run folders: their curves, and evaluations older than the run they measured
    # are refused ("": neither)
    train: str = "artifacts/train"
    grid: str = "artifacts/shards/synthetic/grid.png"  # the synthetic sample grid shown in the report ("": none)
    out: str = "artifacts/report"  # output folder: report.md, plots, summary.json
    allow_unequal_budgets: bool = False  # show variants trained at other budgets (marked) instead of refusing
    # show variants evaluated otherwise (threat model, eps, attacks, test images; marked) instead of refusing
    allow_unequal_evaluations: bool = False
    # paired differences: one variant every other one is compared with (default: the first row), or
    # VARIANT:BASE pairs, comma-separated (the study: AT+DRA:AT,DM-AT+DRA:DM-AT)
    baseline: str = ""
    sweep: str = ""  # a sweep's runs.json (pipeline/report/sweep.py): its table + heatmaps instead
    probe: str = ""  # a probe JSON (`cache probe STORE --out FILE`, or the DVC stage probe), shown beside the sweep
    bench: str = ""  # a `pipeline bench` result (bench.json): its figures table instead
    # a folder of per-epoch validation logs (NAME/log.tsv or NAME/seed*.tsv, `train --val-n`): best and
    # last validation accuracy, the drop between them and the curves (pipeline/report/curves.py), instead
    curves: str = ""
    generator: str = ""  # a folder of generate settings (NAME/generate.json each): the generator quality table instead
    # a folder of standard-AutoAttack results: --evals' fast-subset results of the same runs on the
    # same images against them, run by run (pipeline/report/autoattack.py), instead
    aa_standard: str = ""
    # an `evaluate` result JSON (standard AutoAttack): OUT/model_card.json, its RobustBench leaderboard
    # entry (pipeline/report/model_card.py), instead
    model_card: str = ""
    readme: str = ""  # also write the table into this file between <!-- report:begin/end --> lines

    def validate(self) -> None:
        require(self, [(bool(self.evals), "--evals is empty"), (bool(self.out), "--out is empty")])

"""Per-step and per-epoch metrics of a run through DVCLive (``OUT/dvclive/``).

DVCLive's layout is what ``dvc plots show`` / ``dvc plots diff`` and ``dvc exp show`` read: one TSV per
metric under ``dvclive/plots/metrics/`` (columns ``step`` and the value; no timestamps, so a rerun
writes the same bytes) and the latest values in ``dvclive/metrics.json``. The x axis is the global
optimizer step: ``train/*`` rows every ``--log-every`` steps (the main process's own batch: loss terms,
adversarial and clean accuracy, lr, DRA weight), ``epoch/*`` rows at each epoch's last step (the
epoch means every process agreed on, the rows of ``log.tsv``).

Resume is exact: the rows live in the checkpoint (``RunState.live``), and a resumed run rebuilds
``dvclive/`` from them (``Live(resume=False)`` clears the folder first), so rows logged after the
checkpoint by the interrupted run are gone instead of repeated.

DVCLive is a logger here and nothing else: it finds the DVC repository around the run, if any, and
never makes one. Left alone, outside a DVC repository it runs ``dvc init`` at the root of the Git
repository it finds and stages the new files (its auto-initialisation, treeverse/dvclive pull
request 539), so a training run inside someone's Git project would change that project.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from unittest import mock

LIVE_DIR = "dvclive"


def existing_dvc_repo():  # noqa: ANN201 (a dvc.repo.Repo or None)
    """What DVCLive's ``get_dvc_repo`` returns inside a DVC repository, and None (not a new one) outside."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc.scm import SCMError

    try:
        return Repo()
    except (NotDvcRepoError, SCMError):
        return None


class LiveLog:
    """DVCLive for one run folder (main process only), replaying ``rows`` (``{"step": s, name: value}``)."""

    def __init__(self, out: Path, rows: list[dict]) -> None:
        from dvclive import Live  # imported here: only a training process needs it

        logging.getLogger("dvclive").setLevel(logging.WARNING)  # no "Logging to experiment ..." chatter
        # no dvc.yaml of its own (the project's dvc.yaml declares the plots), no experiment commits,
        # no report: a logger, nothing else
        with mock.patch("dvclive.live.get_dvc_repo", existing_dvc_repo):
            self.live = Live(dir=str(out / LIVE_DIR), resume=False, save_dvc_exp=False, dvcyaml=False, report=None)
        self.rows = rows
        for row in rows:
            self._write(row)
        if rows:  # a fresh run has no summary until its first checkpoint (nothing that looks like results)
            self.sync()

    def _write(self, row: dict) -> None:
        self.live.step = int(row["step"])
        for name, value in row.items():
            if name != "step" and value is not None and not (isinstance(value, float) and math.isnan(value)):
                self.live.log_metric(name, value)

    def log(self, step: int, prefix: str, values: dict[str, float]) -> None:
        """One row at global step ``step``: ``prefix/name`` for each value; kept in ``rows`` (the checkpoint's)."""
        row = {"step": step, **{f"{prefix}/{k}": round(float(v), 6) for k, v in values.items()}}
        self.rows.append(row)
        self._write(row)

    def sync(self) -> None:
        """``dvclive/metrics.json``: the latest value of every metric (at checkpoints and the end)."""
        self.live.make_summary()

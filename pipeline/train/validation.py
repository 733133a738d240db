"""Per-epoch validation of a run (``train --val-n N``) and the checkpoint of its best epoch.

DM-AT's practice (wzekai99/DM-Improves-AT, ``train-wa.py``: the EMA model's clean and PGD
accuracy on held-out images after every epoch, the checkpoint kept at the best robust accuracy):
after each epoch the EMA model (the weights a run saves) is measured, in eval mode, on N images of
the cache's train part that the run does not train on (the rows right after the ``--real-limit``
it uses, never the test split), clean and under PGD (Linf, the run's eps, ``--val-pgd-steps``
steps of 2.5 eps / steps, one random start seeded by the run's seed: the same images and starts
every epoch, so the curve is comparable). ``val_clean``/``val_pgd`` go into log.tsv and DVCLive;
the epoch with the highest ``val_pgd`` (the first, on ties) is kept as a loadable checkpoint folder
``OUT/best`` beside the last one; metrics.json names it. The overfitting curve of plain AT (robust
overfitting: validation PGD falling while training accuracy still rises) is read from these rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from pipeline.classifiers.zoo import save_checkpoint
from pipeline.core.attacks import pgd
from pipeline.core.errors import UserError
from pipeline.core.views import to_float01

BEST_DIR = "best"  # OUT/best: the EMA model of the epoch with the best validation PGD accuracy


@dataclass(frozen=True)
class Validation:
    x: torch.Tensor  # (N, C, H, W) in [0, 1], the unaugmented images
    y: torch.Tensor  # (N,)
    rows: tuple[int, int]  # rows [a, b) of the cache's train part


def validation_set(part: Any, used: int, n: int) -> Validation | None:
    """Rows [used, used + n) of the train part (``used``: the rows training reads), or None for n = 0."""
    if n <= 0:
        return None
    if used + n > part.n:
        raise UserError(f"--val-n {n}: the train part has {part.n} rows and training uses the first {used}; "
                        f"validation needs rows it never trains on (lower --real-limit or --val-n)")
    if not part.has_images:
        raise UserError("--val-n needs a store that holds its train images (extract without --no-images)")
    images = part.read_images(used, used + n)
    return Validation(to_float01(images).contiguous(), torch.from_numpy(part.labels[used:used + n].copy()),
                      (used, used + n))


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> int:
    return int((model(x).argmax(1) == y).sum())


def measure(model: nn.Module, val: Validation, *, eps: float, steps: int, seed: int, device: torch.device,
            batch_size: int = 256) -> dict[str, float]:
    """Clean and PGD accuracy of ``model`` (eval mode; its mode is restored) on the validation rows."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed)
    clean = robust = 0
    try:
        for a in range(0, len(val.y), batch_size):
            x, y = val.x[a:a + batch_size].to(device), val.y[a:a + batch_size].to(device)
            clean += _correct(model, x, y)
            x_adv = pgd(model, x, y, eps=eps, alpha=2.5 * eps / steps, steps=steps, generator=gen)
            robust += _correct(model, x_adv, y)
    finally:
        model.train(was_training)
    n = len(val.y)
    return {"val_clean": round(clean / n, 6), "val_pgd": round(robust / n, 6)}


def is_best(log: list[dict]) -> bool:
    """The last epoch's validation PGD beats every earlier epoch's (the first maximum wins ties)."""
    scores = [r["val_pgd"] for r in log if "val_pgd" in r]
    return bool(scores) and "val_pgd" in log[-1] and all(scores[-1] > s for s in scores[:-1])


def best_epoch(log: list[dict]) -> dict | None:
    """The row of the best validation epoch (for metrics.json), None without validation."""
    rows = [r for r in log if "val_pgd" in r]
    if not rows:
        return None
    r = max(rows, key=lambda r: r["val_pgd"])  # max keeps the first of equals
    return {"epoch": r["epoch"], "step": r["step"], "val_pgd": r["val_pgd"], "val_clean": r["val_clean"]}


def save_best(out: Path, model: nn.Module, meta: dict, row: dict) -> None:
    """``OUT/best``: a checkpoint folder like the run's (evaluate and api.load_classifier read it)."""
    save_checkpoint(out / BEST_DIR, model, {**meta, "finished": True,
                                            "best": {k: row[k] for k in ("epoch", "step", "val_pgd", "val_clean")}})

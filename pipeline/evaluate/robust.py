"""Robustness evaluation: clean accuracy, PGD-CE with restarts, AutoAttack, and sanity checks.

The checks follow the advice of AutoAttack's authors (Croce & Hein 2020, "flags" document) for an
evaluation that is not fooled by the model: the model is in eval mode and deterministic (two
forwards give identical logits), outputs are logits rather than probabilities, input gradients
are non-zero (zero gradients are the signature of gradient masking), adversarial examples stay in
the eps-ball and in [0, 1], robust accuracy never exceeds clean accuracy, the stronger attack
(AutoAttack) is not weaker than PGD, and an attack with a huge eps drives accuracy to ~0 (if it
does not, gradients do not lead anywhere). Each check is a named boolean in the result; failing
ones are listed under ``warnings``.

AutoAttack versions:
- ``standard``: APGD-CE, APGD-T (9 targets), FAB-T, Square (5000 queries); the reference.
- ``fast`` ("AutoAttack-fast"): APGD-CE (1 restart) + APGD-T (``fast_targets`` target classes),
  ``fast_iters`` iterations each (standard: 9 targets, 100 iterations). A documented cheaper
  subset for CPU budgets: it keeps the two gradient attacks that account for nearly all of
  standard AA's successes on models without gradient masking, and drops FAB-T and the black-box
  Square attack (whose job, detecting masking, the checks below take over in part). Its accuracy
  is an expected upper bound on standard AutoAttack's and is labelled as such in the report.

Important: APGD derives its step-size schedule (checkpoints ``n_iter_2``, ``n_iter_min``,
``size_decr``) from ``n_iter`` once, in ``APGDAttack.__init__`` (fra31/auto-attack,
``autopgd_base.py``; pyautoattack keeps that code). Setting ``n_iter`` on a constructed attack
keeps the 100-iteration schedule, a weaker attack than its label says. ``fast_apgd`` therefore
constructs both attacks with their iteration count.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.attacks import pgd
from pipeline.evaluate.config import AutoAttackVersion

FAST_ATTACKS = ["apgd-ce", "apgd-t"]


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 250) -> torch.Tensor:
    """Argmax predictions, batched."""
    if len(x) == 0:  # a process whose slice of the test set is empty
        return torch.zeros(0, dtype=torch.long, device=x.device)
    return torch.cat([model(x[i:i + batch_size]).argmax(1) for i in range(0, len(x), batch_size)])


def clean_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 250) -> torch.Tensor:
    """Per-sample bool mask: the model classifies the clean image correctly."""
    return predict(model, x, batch_size=batch_size) == y


def split_range(n: int, rank: int, world: int) -> tuple[int, int]:
    """Contiguous slice [start, end) of n items that process ``rank`` of ``world`` owns.

    The slices cover 0..n in rank order and their sizes differ by at most 1.
    """
    return n * rank // world, n * (rank + 1) // world


def _grid_generator(seed: int, start: int) -> torch.Generator:
    """CPU generator of the random starts of the batch that begins at global index ``start``."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, start]).generate_state(1)[0]))


def _bar(desc: str, total: int, progress: bool) -> tqdm:
    """A progress bar on stderr: images done / total, with the running accuracy as its postfix."""
    return tqdm(total=total, desc=desc, unit="img", mininterval=2, disable=not progress)


def pgd_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float,
                steps: int, restarts: int, batch_size: int = 250, seed: int = 0,
                offset: int = 0, progress: bool = False) -> tuple[torch.Tensor, dict]:
    """Per-sample mask of points that survive every PGD-CE restart, and perturbation stats.

    Restarts are run here, one ``pgd`` call each, so that a point counts as broken if ANY restart
    breaks it (worst case over restarts, whatever ``pgd`` does internally with its own restarts).

    ``x`` may be a slice of a larger set that starts at global index ``offset``. Batches follow a
    grid of ``batch_size`` over global indices and each grid batch has its own generator seeded
    from (seed, its global start), drawing a start for every grid row in every restart, so a
    sample's random start depends only on (seed, batch_size, its global index, the restart): any
    split of the set into slices gives the same masks as one pass over it.

    ``progress``: a bar per grid batch (images done, robust accuracy of those so far).
    """
    robust = clean_correct(model, x, y, batch_size=batch_size)
    stats = {"max_linf": 0.0, "in_range": True}
    end = offset + len(x)
    bar = _bar(f"pgd-{steps}x{restarts}", len(x), progress)
    for g in range(offset - offset % batch_size, end, batch_size):
        lo, hi = max(g, offset), min(g + batch_size, end)  # the part of grid batch g held here
        gen = _grid_generator(seed, g)
        for _ in range(restarts):
            # important: draw the whole grid batch (also rows of other slices and broken points)
            # so that the draw of a row never depends on which rows this process holds
            u = torch.rand((batch_size, *x.shape[1:]), generator=gen)[lo - g:hi - g]
            idx = torch.nonzero(robust[lo - offset:hi - offset]).flatten()
            if len(idx) == 0:
                break  # nothing left to break in this batch; later draws would be unused
            start = ((2 * u[idx.cpu()] - 1) * eps).to(x)
            idx += lo - offset
            x_adv = pgd(model, x[idx], y[idx], eps=eps, alpha=alpha, steps=steps, restarts=1, loss="ce",
                        start=start)
            _update(stats, x_adv, x[idx])
            robust[idx] &= predict(model, x_adv, batch_size=batch_size) == y[idx]
        bar.update(hi - lo)
        bar.set_postfix_str(f"acc={float(robust[:hi - offset].float().mean()):.3f}", refresh=False)
    bar.close()
    return robust, stats


def autoattack_correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float,
                       version: AutoAttackVersion, fast_targets: int = 3, fast_iters: int = 100,
                       batch_size: int = 250, seed: int = 0,
                       progress: bool = False) -> tuple[torch.Tensor, dict, list[str]]:
    """Per-sample robust mask under AutoAttack (Linf), perturbation stats, the attacks run.
    ``progress``: a bar per attack (``AttackProgress``)."""
    logging.getLogger("auto-attack").setLevel(logging.WARNING)  # per-batch debug lines are noise
    aa = make_autoattack(model, eps=eps, version=version, fast_targets=fast_targets, fast_iters=fast_iters,
                         seed=seed, device=x.device)
    stats = {"max_linf": 0.0, "in_range": True}
    if len(x) == 0:
        return torch.zeros(0, dtype=torch.bool, device=x.device), stats, list(aa.attacks_to_run)
    bars = AttackProgress(aa, int(clean_correct(model, x, y, batch_size=batch_size).sum()), len(x)) if progress else None
    x_adv, _ = aa.run_standard_evaluation(x, y, batch_size=batch_size)
    if bars:
        bars.close()
    robust = predict(model, x_adv, batch_size=batch_size) == y
    _update(stats, x_adv, x)
    return robust, stats, list(aa.attacks_to_run)


class AttackProgress:
    """One bar per AutoAttack attack: images attacked of those still robust when it began, and the
    running robust accuracy of the set. It hooks each attack's ``perturb`` and the ``get_logits``
    call AutoAttack makes on every result (to drop the images it broke): no forward pass per attack
    (only the clean one that counts ``robust`` at the start), nothing AutoAttack computes changes."""

    def __init__(self, aa: Any, robust: int, n: int) -> None:
        self.robust, self.n, self.name, self.bar, self.pending = robust, n, "", None, None
        for attr in ("apgd", "apgd_targeted", "fab", "square"):
            if getattr(aa, attr, None) is not None:
                attack = getattr(aa, attr)
                attack.perturb = self._perturb(attack, attr)
        get_logits = aa.get_logits

        def logits(x: torch.Tensor) -> torch.Tensor:
            out = get_logits(x)
            if self.pending is not None and x is self.pending[0]:  # AutoAttack's check of a result
                self.robust -= int((out.argmax(1) != self.pending[1]).sum())
                self.pending = None
                self.bar.set_postfix_str(f"acc={self.robust / max(self.n, 1):.3f}", refresh=False)
            return out

        aa.get_logits = logits

    def _perturb(self, attack: Any, attr: str) -> Any:
        perturb = attack.perturb

        def run(x: torch.Tensor, y: torch.Tensor, *args: Any, **kw: Any) -> torch.Tensor:
            name = self.label(attack, attr)
            if name != self.name:
                self.close()
                self.name, self.bar = name, _bar(f"autoattack {name}", self.robust, True)
            adv = perturb(x, y, *args, **kw)
            self.bar.update(len(x))
            self.pending = (adv, y)
            return adv

        return run

    @staticmethod
    def label(attack: Any, attr: str) -> str:
        """The bar's name: only APGD has a ``loss`` (FAB and Square have none)."""
        if attr == "apgd":
            return f"apgd-{attack.loss}"
        if attr == "fab":
            return "fab-t" if getattr(attack, "targeted", False) else "fab"
        return {"apgd_targeted": "apgd-t", "square": "square"}[attr]

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def make_autoattack(model: nn.Module, *, eps: float, version: AutoAttackVersion, fast_targets: int = 3,
                    fast_iters: int = 100, seed: int = 0, device: Any = None) -> Any:
    """pyautoattack's AutoAttack (Linf): ``standard`` as published, or ``fast`` (see the module docstring)."""
    from pyautoattack import AutoAttack

    if version == AutoAttackVersion.standard:
        return AutoAttack(model, eps=eps, norm="Linf", version="standard", seed=seed, device=device)
    aa = AutoAttack(model, eps=eps, norm="Linf", version="custom", attacks=list(FAST_ATTACKS), seed=seed,
                    device=device)
    aa.apgd, aa.apgd_targeted = fast_apgd(aa, n_iter=fast_iters, targets=fast_targets)
    return aa


def fast_apgd(aa: Any, *, n_iter: int, targets: int) -> tuple[Any, Any]:
    """APGD-CE and APGD-T for AutoAttack-fast, constructed with ``n_iter`` so that every schedule
    quantity follows it; the other settings are those AutoAttack gives its own two attacks
    (rho 0.75, 1 EOT iteration, 1 restart, its seed, device and logger)."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    kw = dict(n_iter=n_iter, norm=aa.norm, n_restarts=1, eps=aa.epsilon, seed=aa.seed, eot_iter=1, rho=0.75,
              verbose=False, device=aa.device, logger=aa.logger)
    return APGDAttack(aa.model, **kw), APGDAttack_targeted(aa.model, n_target_classes=targets, **kw)


def merge_stats(parts: list[dict]) -> dict:
    """Perturbation stats of the whole set from those of its slices."""
    return {"max_linf": max(p["max_linf"] for p in parts), "in_range": all(p["in_range"] for p in parts)}


def _update(stats: dict, x_adv: torch.Tensor, x: torch.Tensor) -> None:
    """Track the largest Linf perturbation and whether every adversarial image is in [0, 1]."""
    if len(x):
        stats["max_linf"] = max(stats["max_linf"], float((x_adv - x).abs().max()))
        stats["in_range"] &= bool(x_adv.min() >= 0 and x_adv.max() <= 1)


def model_checks(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict:
    """Checks on the model alone (a small batch is enough): mode, determinism, logits, gradients."""
    with torch.no_grad():
        a, b = model(x), model(x)
    xg = x.clone().requires_grad_(True)
    grad, = torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)
    zero = int((grad.flatten(1).abs().sum(1) == 0).sum())
    probs_like = bool(a.min() >= 0 and a.max() <= 1 and torch.allclose(a.sum(1), torch.ones(len(a)).to(a)))
    return {
        "eval_mode": not any(m.training for m in model.modules()),
        "deterministic": bool(torch.equal(a, b)),
        "outputs_are_logits": not probs_like,
        "nonzero_input_gradients": zero == 0,
        "zero_gradient_points": zero,
        "finite_outputs": bool(torch.isfinite(a).all()),
    }


def large_eps_accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float = 0.5,
                       steps: int = 20, seed: int = 0) -> float:
    """Accuracy under PGD with a huge budget: should be ~0; if not, the gradients are masked."""
    u = torch.rand(x.shape, generator=torch.Generator().manual_seed(seed))  # on the CPU, any device
    x_adv = pgd(model, x, y, eps=eps, alpha=eps / 8, steps=steps, restarts=1, loss="ce",
                start=((2 * u - 1) * eps).to(x))
    return float((predict(model, x_adv) == y).float().mean())


def result_checks(*, clean: float, pgd_acc: float, aa_acc: float | None, eps: float, pgd_stats: dict,
                  aa_stats: dict | None, big_eps_acc: float, aa_bounds: tuple[float, float] | None = None,
                  tol: float = 1e-5) -> dict:
    """Consistency checks between the accuracies; aa_* None when AutoAttack did not run.
    ``aa_bounds``: (clean, PGD) accuracy on AutoAttack's images where it attacked fewer than the others."""
    aa_clean, aa_pgd = aa_bounds or (clean, pgd_acc)
    out = {
        "pgd_le_clean": pgd_acc <= clean + tol,
        "pgd_in_eps_ball": pgd_stats["max_linf"] <= eps + tol and pgd_stats["in_range"],
        "large_eps_breaks_model": big_eps_acc <= 0.05,
        "large_eps_accuracy": big_eps_acc,
    }
    if aa_acc is not None:
        out["autoattack_le_clean"] = aa_acc <= aa_clean + tol
        out["autoattack_le_pgd"] = aa_acc <= aa_pgd + tol
        out["autoattack_in_eps_ball"] = aa_stats["max_linf"] <= eps + tol and aa_stats["in_range"]
    return out


def failed(checks: dict) -> list[str]:
    """Names of boolean checks that did not pass."""
    return sorted(k for k, v in checks.items() if isinstance(v, bool) and not v)

"""One optimisation step's computation, composed by the `train` stage (pure functions of their inputs).

- ``adversarial_step``: attack -> forward -> loss terms (PGD-AT or TRADES, plus DRA on the
  adversarial, the clean or both inputs); returns the unweighted terms and the weighted total, and
  on request the DRA term's share of the backbone gradient (``dra_grad_share``). The optimizer,
  modes and logging stay in the loop.
- the targets in the loss's space (``normalise_targets``: centred, whitened or PCA-whitened),
  BatchNorm statistics per slice of a concatenated batch (TRADES), clean accuracy.

The model and its head are in model.py, the schedules in schedules.py, checkpoints in state.py.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.attacks import frozen, pgd
from pipeline.train.config import AlignInput, Method, TargetNorm
from pipeline.train.losses import dra_loss, pgd_at_loss, trades_loss


def normalise_targets(t: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, kind: TargetNorm,
                      whitening: torch.Tensor | None = None) -> torch.Tensor:
    """float32 targets in the space the cosine loss compares in (mean/std from the cache).

    ``pca``: centred, then mapped by ``whitening`` (C x C, ``pca_whitening``) on the channel axis
    (the vector of a pooled target, the channels at every location of a grid target), so that the
    train targets' principal directions all have unit variance: a target whose variance sits in one
    or two directions (a near-scalar target) gets its other directions back into the cosine."""
    t = t.float()
    if kind is TargetNorm.none:
        return t
    t = t - mean
    if kind is TargetNorm.pca:
        if whitening is None:
            raise ValueError("--target-norm pca needs the whitening matrix (pca_whitening)")
        return t @ whitening if t.ndim == 2 else torch.einsum("bc...,cd->bd...", t, whitening)
    return t / (std + 1e-6) if kind is TargetNorm.whiten else t


def pca_whitening(sample: np.ndarray, mean: np.ndarray, *, rel_eps: float = 1e-6) -> torch.Tensor:
    """W (C x C) with W' S W = I for the covariance S of ``sample`` (targets (N, *shape)) around
    ``mean``: S's eigenvectors scaled by 1 / sqrt(eigenvalue + eps), eps = ``rel_eps`` x the mean
    eigenvalue (directions with no variance are not blown up). Channels are axis 1 of a grid target
    (C, G, G), whose locations all count as samples of the same C channels."""
    x = np.asarray(sample, np.float64) - np.asarray(mean, np.float64)
    x = x.reshape(len(x), -1) if x.ndim == 2 else np.moveaxis(x, 1, -1).reshape(-1, x.shape[1])
    cov = x.T @ x / max(len(x) - 1, 1)
    lam, vec = np.linalg.eigh(cov)
    lam = np.clip(lam, 0, None)
    w = vec / np.sqrt(lam + rel_eps * max(lam.mean(), 1e-12))
    return torch.from_numpy(w).float()


@dataclass(frozen=True)
class StepSettings:
    method: Method
    eps: float
    alpha: float
    steps: int
    beta: float
    label_smoothing: float
    align: AlignInput = AlignInput.adv  # which input's features the DRA head reads


def dra_grad_share(total: torch.Tensor, dra_part: torch.Tensor, params: Sequence[nn.Parameter]) -> torch.Tensor:
    """||d(lambda * DRA)/d theta|| / ||d(total loss)/d theta|| over the parameters ``params``.

    How it is measured: two ``torch.autograd.grad`` calls on the step's own graph (kept with
    ``retain_graph``) before the step's backward, on the same batch, adversarial examples and
    weights the update uses; nothing is accumulated into ``.grad`` and no random number is drawn, so
    the update is the same with or without the measurement. With several processes each measures
    its own batch before the gradients are averaged (the log averages the processes' values). 0:
    the DRA term does not move the backbone; 1: it is the whole gradient (larger than 1 when it
    opposes the rest).
    """
    params = list(params)
    g_dra = torch.autograd.grad(dra_part, params, retain_graph=True, allow_unused=True)
    g_all = torch.autograd.grad(total, params, retain_graph=True, allow_unused=True)

    def norm(grads: Sequence[torch.Tensor | None]) -> torch.Tensor:
        squares = [g.detach().float().pow(2).sum() for g in grads if g is not None]
        return torch.stack(squares).sum().sqrt() if squares else torch.zeros((), device=total.device)

    return (norm(g_dra) / norm(g_all).clamp_min(1e-12)).detach()


def adversarial_step(net: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     target: torch.Tensor | None, dra_w: float, s: StepSettings,
                     gen: torch.Generator | None, grad_share: Sequence[nn.Parameter] | None = None,
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Attack, forward, loss. Returns (weighted total, unweighted terms, adversarial logits).

    ``net`` may be a DDP wrapper of a DRANet (the forward that computes the loss goes through it,
    for gradient sync); ``classifier`` is the unwrapped classifier the attack differentiates.
    The perturbation is added to the (already augmented) view; the target belongs to that view.
    TRADES: clean and adversarial inputs go through one concatenated forward (so that under DDP
    every parameter is used once per backward), but each half is batch-normalised with its own
    statistics, as the two separate forwards of the reference do (yaodongyu/TRADES, ``trades.py``;
    wzekai99/DM-Improves-AT, ``core/utils/trades.py``).

    ``s.align`` (``--align-input``): the DRA head reads the adversarial input's features (``adv``,
    the paper's), the clean view's (``clean``) or both (``both``: ``dra`` is the mean of the two
    terms, logged as ``dra_adv`` and ``dra_clean`` too). PGD-AT with ``clean``/``both`` adds the clean
    view to the forward, batch-normalised with its own statistics and without updating the running
    statistics, so the AT part of the step (logits, BatchNorm state) is the same as with ``adv``.
    ``grad_share`` (the backbone's parameters): also measure ``dra_grad_share`` (a diagnostic term,
    not part of the total).
    """
    dra = pred_adv = pred_clean = None
    both_inputs = target is not None and s.align is not AlignInput.adv
    if s.method is Method.pgd:
        x_adv = pgd(classifier, x, y, eps=s.eps, alpha=s.alpha, steps=s.steps, loss="ce", generator=gen)
        if both_inputs:
            with separate_batch_stats(classifier, 2, update=(True, False)):
                logits, pred = net(torch.cat([x_adv, x]))
            logits_adv = logits[:len(x)]
            if pred is not None:
                pred_adv, pred_clean = pred[:len(x)], pred[len(x):]
        else:
            logits_adv, pred_adv = net(x_adv)
        terms = pgd_at_loss(logits_adv, y, label_smoothing=s.label_smoothing)
        total = terms["ce"]
    else:
        x_adv = pgd(classifier, x, y, eps=s.eps, alpha=s.alpha, steps=s.steps, loss="kl", generator=gen)
        with separate_batch_stats(classifier, 2):
            logits, pred = net(torch.cat([x, x_adv]))
        logits_clean, logits_adv = logits.chunk(2)
        if pred is not None:
            pred_clean, pred_adv = pred[:len(x)], pred[len(x):]
        terms = trades_loss(logits_clean, logits_adv, y, label_smoothing=s.label_smoothing)
        total = terms["ce"] + s.beta * terms["kl"]
    if pred_adv is not None and target is not None:
        if s.align is AlignInput.adv:
            terms.update(dra_loss(pred_adv, target.reshape(pred_adv.shape)))
        elif s.align is AlignInput.clean:
            terms.update(dra_loss(pred_clean, target.reshape(pred_clean.shape)))
        else:
            a = dra_loss(pred_adv, target.reshape(pred_adv.shape))["dra"]
            c = dra_loss(pred_clean, target.reshape(pred_clean.shape))["dra"]
            terms.update(dra=(a + c) / 2, dra_adv=a, dra_clean=c)
        dra = dra_w * terms["dra"]
        total = total + dra
        if grad_share is not None:
            terms["dra_grad_share"] = dra_grad_share(total, dra, grad_share)
    return total, terms, logits_adv.detach()


@contextlib.contextmanager
def separate_batch_stats(model: nn.Module, groups: int, update: Sequence[bool] | None = None) -> Iterator[None]:
    """Inside, every BatchNorm of ``model`` normalises each of ``groups`` equal slices of its batch
    with that slice's own statistics (and, in training mode, updates its running statistics once
    per slice, in order): one forward of ``cat([a, b])`` equals ``forward(a)`` then ``forward(b)``.
    ``update[i]`` False: slice i leaves the running statistics as they were (it is normalised with
    its own batch statistics all the same).
    """
    keep = list(update) if update is not None else [True] * groups
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]

    def sliced(m: Any, plain: Any, x: torch.Tensor) -> torch.Tensor:
        # a slice that keeps the running statistics: the training-mode normalisation without them
        # (restoring them in place afterwards would break the backward, which saved them)
        return torch.cat([plain(m, part) if upd or not m.training else
                          F.batch_norm(part, None, None, m.weight, m.bias, True, 0.0, m.eps)
                          for part, upd in zip(x.chunk(groups), keep)])

    for m in norms:
        m.forward = lambda x, m=m, plain=type(m).forward: sliced(m, plain, x)
    try:
        yield
    finally:
        for m in norms:
            del m.forward  # the class's forward again


@torch.no_grad()
def clean_accuracy(classifier: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Accuracy on clean inputs in eval mode (BN statistics untouched)."""
    with frozen(classifier):
        return (classifier(x).argmax(1) == y).float().mean()



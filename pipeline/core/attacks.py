"""L-infinity PGD (Madry et al. 2018), as a pure function of the model and a batch.

Important: the attack must not change what it attacks. It runs the model in eval mode (BatchNorm
uses and keeps its running statistics, dropout is off), restores the caller's train/eval mode
afterwards, and takes gradients with ``torch.autograd.grad`` with respect to the input only, so
parameter ``.grad`` buffers and optimizer state are never touched.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn as nn
import torch.nn.functional as F

LOSSES = ("ce", "kl")


@contextmanager
def frozen(model: nn.Module) -> Iterator[nn.Module]:
    """Eval mode for the duration, then every submodule's own mode restored exactly."""
    modes = {m: m.training for m in model.modules()}
    model.eval()
    try:
        yield model
    finally:
        for m, mode in modes.items():
            m.training = mode


def _objective(logits: torch.Tensor, y: torch.Tensor, loss: str, ref: torch.Tensor | None) -> torch.Tensor:
    """Per-sample loss the attack ascends: cross-entropy, or TRADES' KL(p_clean || p_adv)."""
    if loss == "ce":
        return F.cross_entropy(logits, y, reduction="none")
    return F.kl_div(F.log_softmax(logits, 1), ref, reduction="none").sum(1)


def _start(x: torch.Tensor, eps: float, loss: str, random_start: bool,
           generator: torch.Generator | None) -> torch.Tensor:
    if not random_start:
        return torch.zeros_like(x)
    if loss == "kl":  # TRADES convention: a tiny Gaussian start around the clean point
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 1e-3
        return noise.clamp(-eps, eps)
    u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    return (2 * u - 1) * eps


def pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eps: float, alpha: float, steps: int,
        restarts: int = 1, random_start: bool = True, loss: str = "ce",
        generator: torch.Generator | None = None, start: torch.Tensor | None = None) -> torch.Tensor:
    """Projected gradient ascent on ``loss`` within the Linf ball of radius eps; returns x_adv in [0,1].

    loss "ce" attacks the labels (PGD-AT, evaluation); "kl" moves away from the model's own clean
    prediction (TRADES' inner maximisation). With several restarts each sample keeps the restart
    with the highest final loss. ``generator`` makes the random start reproducible (resume).
    ``start`` is an initial perturbation drawn by the caller (one restart; it replaces the random
    start), for callers whose starts must not depend on how samples are grouped into batches.
    """
    if loss not in LOSSES:
        raise ValueError(f"unknown attack loss {loss!r}; choose one of {LOSSES}")
    if start is not None and (restarts > 1 or start.shape != x.shape):
        raise ValueError("start is the initial perturbation of a single restart, shaped like x")
    x = x.detach()
    with frozen(model), torch.enable_grad():
        ref = F.softmax(model(x), 1).detach() if loss == "kl" else None
        best, best_loss = x.clone(), torch.full((x.shape[0],), -float("inf"), device=x.device)
        for _ in range(max(1, restarts)):
            delta = _start(x, eps, loss, random_start, generator) if start is None else start.to(x).clamp(-eps, eps)
            delta = (x + delta).clamp(0, 1) - x
            for _ in range(steps):
                delta.requires_grad_(True)
                obj = _objective(model(x + delta), y, loss, ref)
                (grad,) = torch.autograd.grad(obj.sum(), delta)
                delta = (delta.detach() + alpha * grad.sign()).clamp(-eps, eps)
                delta = (x + delta).clamp(0, 1) - x
            x_adv = (x + delta).detach()
            if restarts <= 1:
                return x_adv
            with torch.no_grad():
                final = _objective(model(x_adv), y, loss, ref)
            better = final > best_loss
            best[better], best_loss[better] = x_adv[better], final[better]
    return best

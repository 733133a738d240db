"""The pieces of one adversarial-training run that the `train` stage composes.

- ``DRANet``: classifier + projection head in one module, so one forward yields both logits and the
  head's prediction from the same penultimate features (and DDP sees every parameter).
- ``adversarial_step``: attack -> forward -> loss terms (PGD-AT or TRADES, plus DRA); returns the
  unweighted terms and the weighted total. The optimizer, modes and logging stay in the loop.
- schedules for the learning rate and the DRA weight, target normalisation, EMA of weights, and
  run state <-> flat tensor dicts (for safetensors checkpoints: never pickle).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn

from pipeline.core.attacks import frozen, pgd
from pipeline.train.config import DRASchedule, LRSchedule, Method, TargetNorm
from pipeline.train.losses import dra_loss, pgd_at_loss, trades_loss


class ProjectionHead(nn.Module):
    """DRA head: MLP from classifier features to the diffusion embedding space (REPA style)."""

    def __init__(self, in_dim: int, hidden: int, out_dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, out_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.net(h)


class DRANet(nn.Module):
    """forward(x) -> (logits, head(features) or None)."""

    def __init__(self, classifier: nn.Module, head: nn.Module | None):
        super().__init__()
        self.classifier, self.head = classifier, head

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        h = self.classifier.features(x)
        return self.classifier.fc(h), (self.head(h) if self.head is not None else None)


def lr_at(step: int, total: int, base: float, kind: LRSchedule) -> float:
    """Per-step learning rate. onecycle: linear warmup from base/25 over 30%, then cosine to 0."""
    p = min(step / max(total, 1), 1.0)
    if kind is LRSchedule.cosine:
        return base * 0.5 * (1 + math.cos(math.pi * p))
    if p < 0.3:
        return base * (1 / 25 + (1 - 1 / 25) * p / 0.3)
    return base * 0.5 * (1 + math.cos(math.pi * (p - 0.3) / 0.7))


def dra_weight_at(step: int, total: int, weight: float, kind: DRASchedule) -> float:
    p = min(step / max(total, 1), 1.0)
    if kind is DRASchedule.linear_warmup:
        return weight * min(1.0, p / 0.25)
    if kind is DRASchedule.cosine_decay:
        return weight * 0.5 * (1 + math.cos(math.pi * p))
    return weight


def normalise_targets(t: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, kind: TargetNorm) -> torch.Tensor:
    """float32 targets in the space the cosine loss compares in (mean/std from the cache)."""
    t = t.float()
    if kind is TargetNorm.none:
        return t
    t = t - mean
    return t / (std + 1e-6) if kind is TargetNorm.whiten else t


@dataclass(frozen=True)
class StepSettings:
    method: Method
    eps: float
    alpha: float
    steps: int
    beta: float
    label_smoothing: float


def adversarial_step(net: nn.Module, classifier: nn.Module, x: torch.Tensor, y: torch.Tensor,
                     target: torch.Tensor | None, dra_w: float, s: StepSettings,
                     gen: torch.Generator | None) -> tuple[torch.Tensor, dict[str, torch.Tensor], torch.Tensor]:
    """Attack, forward, loss. Returns (weighted total, unweighted terms, adversarial logits).

    ``net`` may be a DDP wrapper of a DRANet (the forward that computes the loss goes through it,
    for gradient sync); ``classifier`` is the unwrapped classifier the attack differentiates.
    The perturbation is added to the (already augmented) view; the target belongs to that view.
    TRADES: clean and adversarial inputs go through one concatenated forward (so that under DDP
    every parameter is used once per backward), but each half is batch-normalised with its own
    statistics, as the two separate forwards of the reference do (yaodongyu/TRADES, ``trades.py``;
    wzekai99/DM-Improves-AT, ``core/utils/trades.py``).
    """
    if s.method is Method.pgd:
        x_adv = pgd(classifier, x, y, eps=s.eps, alpha=s.alpha, steps=s.steps, loss="ce", generator=gen)
        logits_adv, pred = net(x_adv)
        terms = pgd_at_loss(logits_adv, y, label_smoothing=s.label_smoothing)
        total = terms["ce"]
    else:
        x_adv = pgd(classifier, x, y, eps=s.eps, alpha=s.alpha, steps=s.steps, loss="kl", generator=gen)
        with separate_batch_stats(classifier, 2):
            logits, pred = net(torch.cat([x, x_adv]))
        logits_clean, logits_adv = logits.chunk(2)
        pred = pred[len(x):] if pred is not None else None
        terms = trades_loss(logits_clean, logits_adv, y, label_smoothing=s.label_smoothing)
        total = terms["ce"] + s.beta * terms["kl"]
    if pred is not None and target is not None:
        terms.update(dra_loss(pred, target))
        total = total + dra_w * terms["dra"]
    return total, terms, logits_adv.detach()


@contextlib.contextmanager
def separate_batch_stats(model: nn.Module, groups: int) -> Iterator[None]:
    """Inside, every BatchNorm of ``model`` normalises each of ``groups`` equal slices of its batch
    with that slice's own statistics (and, in training mode, updates its running statistics once
    per slice, in order): one forward of ``cat([a, b])`` equals ``forward(a)`` then ``forward(b)``.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        plain = type(m).forward
        m.forward = lambda x, m=m, plain=plain: torch.cat([plain(m, part) for part in x.chunk(groups)])
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


class EMA:
    """Exponential moving average of parameters; buffers (BN statistics) are copied.

    The decay warms up as min(decay, (1 + t) / (10 + t)) at step t, so a short run's average is
    not dominated by its first, untrained weights (decay 0.995 alone spans ~200 steps).
    """

    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, step: int) -> None:
        decay = min(self.decay, (1 + step) / (10 + step))
        for e, p in zip(self.model.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1 - decay)
        for e, b in zip(self.model.buffers(), model.buffers()):
            e.copy_(b)


# --- run state as flat tensor dicts (safetensors) ---------------------------------------------
def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """SGD momentum buffers by parameter position."""
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"momentum.{i}"] = buf
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, t in tensors.items():
        p = params[int(key.split(".")[1])]
        opt.state[p]["momentum_buffer"] = t.to(p.device, p.dtype).clone()


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}


def as_tensor(values: list[float] | np.ndarray, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.as_tensor(np.asarray(values), dtype=dtype)

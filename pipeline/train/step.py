"""The pieces of one adversarial-training run that the `train` stage composes.

- ``DRANet``: classifier + projection head in one module, so one forward yields both logits and the
  head's prediction (from the penultimate features, or from the map of the block ``--align-layer``
  names) and DDP sees every parameter; ``build_dra_net`` picks the head for a target set.
- ``adversarial_step``: attack -> forward -> loss terms (PGD-AT or TRADES, plus DRA on the
  adversarial, the clean or both inputs); returns the unweighted terms and the weighted total, and
  on request the DRA term's share of the backbone gradient. The optimizer, modes and logging stay
  in the loop.
- schedules for the learning rate and the DRA weight, target normalisation, EMA of weights, and
  run state <-> flat tensor dicts (for safetensors checkpoints: never pickle).
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.core.attacks import frozen, pgd
from pipeline.core.classifiers import feature_blocks
from pipeline.core.errors import UserError
from pipeline.train.config import AlignInput, DRASchedule, LRSchedule, Method, TargetNorm
from pipeline.train.losses import dra_loss, pgd_at_loss, trades_loss


class ProjectionHead(nn.Module):
    """DRA head: MLP from classifier features to the diffusion embedding space (REPA style).

    ``out_shape`` (a grid target's (C, G, G); no parameters) reshapes the output, so a pooled
    vector can be aligned per location too; the state dict is the same either way.
    """

    def __init__(self, in_dim: int, hidden: int, out_dim: int, out_shape: Sequence[int] | None = None):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(in_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden),
                                 nn.SiLU(), nn.Linear(hidden, out_dim))
        self.out_shape = tuple(out_shape) if out_shape else None

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.net(h)
        return out.reshape(len(out), *self.out_shape) if self.out_shape else out


class MapHead(nn.Module):
    """DRA head on a classifier feature map (``--align-layer``), REPA's projector per location.

    (B, C_in, H, W) -> adaptive average pooling to the target's G x G grid -> the same three-layer
    MLP (Linear, SiLU, Linear, SiLU, Linear, as ``ProjectionHead``) at every location, written as
    1x1 convolutions -> (B, C, G, G). REPA applies its projector MLP to every token of an
    intermediate block (sihyun-yu/REPA ``models/sit.py``: ``build_mlp``, applied to the tokens of
    block ``encoder_depth``) and compares token by token (``loss.py``). A vector target
    (``grid=None``) pools the map to one location: (B, C).
    """

    def __init__(self, in_channels: int, hidden: int, out_channels: int, grid: int | None):
        super().__init__()
        self.grid = grid
        self.net = nn.Sequential(nn.Conv2d(in_channels, hidden, 1), nn.SiLU(), nn.Conv2d(hidden, hidden, 1),
                                 nn.SiLU(), nn.Conv2d(hidden, out_channels, 1))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        out = self.net(F.adaptive_avg_pool2d(h, self.grid or 1))
        return out if self.grid else out.flatten(1)


class DRANet(nn.Module):
    """forward(x) -> (logits, head(features) or None).

    The head reads the classifier's final pooled features, or, with ``align_layer``, the output
    map of that block of the classifier (kept by a forward hook that lives only for the call, so
    attacks on the classifier and its EMA copy never carry it).
    """

    def __init__(self, classifier: nn.Module, head: nn.Module | None, align_layer: str = ""):
        super().__init__()
        self.classifier, self.head = classifier, head
        self.align_layer = align_layer if head is not None else ""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        if not self.align_layer:
            h = self.classifier.features(x)
            return self.classifier.fc(h), (self.head(h) if self.head is not None else None)
        kept: list[torch.Tensor] = []
        handle = self.classifier.get_submodule(self.align_layer).register_forward_hook(
            lambda _m, _i, out: kept.append(out))
        try:
            h = self.classifier.features(x)
        finally:
            handle.remove()
        return self.classifier.fc(h), self.head(kept[-1])


def build_dra_net(classifier: nn.Module, target: Any, hidden: int, align_layer: str = "", *,
                  in_channels: int, image_size: int) -> DRANet:
    """The classifier with the DRA head a target set needs (``target`` None: no head, plain AT).

    Without ``align_layer``: ``ProjectionHead`` on the final pooled features (the default, built
    exactly as before); its output is reshaped to a grid target's (C, G, G). With it: ``MapHead``
    on that block's map (refused with the list of blocks when the classifier has no such block).
    """
    if target is None:
        return DRANet(classifier, None)
    if not align_layer:
        return DRANet(classifier, ProjectionHead(classifier.feature_dim, hidden, target.size,
                                                 target.shape if target.grid else None))
    blocks = feature_blocks(classifier, in_channels, image_size)
    if align_layer not in blocks:
        arch = getattr(classifier, "arch", type(classifier).__name__)
        raise UserError(f"--align-layer {align_layer!r} is not a block of the {arch} classifier; blocks with a "
                        f"feature map: {', '.join(f'{k} {chw[0]}x{chw[1]}x{chw[2]}' for k, chw in blocks.items())}")
    return DRANet(classifier, MapHead(blocks[align_layer][0], hidden, target.channels, target.grid), align_layer)


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


def backbone_parameters(classifier: nn.Module) -> list[nn.Parameter]:
    """The classifier's parameters but its final linear layer ``fc``: what DRA and AT both shape."""
    return [p for name, p in classifier.named_parameters() if not name.startswith("fc.") and p.requires_grad]


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


"""What a run trains: the classifier with its DRA head (``DRANet``: a ``ProjectionHead`` on the pooled
features, or a ``MapHead`` on a block's map, per location), the backbone's parameters, and the EMA of
the weights that is saved and evaluated."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.classifiers.zoo import feature_blocks
from pipeline.core.errors import UserError


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


def backbone_parameters(classifier: nn.Module) -> list[nn.Parameter]:
    """The classifier's parameters but its final linear layer ``fc``: what DRA and AT both shape."""
    return [p for name, p in classifier.named_parameters() if not name.startswith("fc.") and p.requires_grad]


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

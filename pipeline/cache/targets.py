"""The target specification: what each (sample, view) row of a target set holds.

A target is the diffusion model's activation of block ``layer`` at timestep ``t`` for one
augmented view, reduced by ``pooling`` to an array of ``shape`` and stored as float16. A cache
holds one or more target sets, one per (t, layer), each named ``t{t}-{layer}``; the root
attribute ``targets`` lists their specs and ``default_target`` names the one training uses
unless told otherwise. The spec is the one place that knows a target's shape:

- the producer (``FeatureExtractor``) reduces a block's output with ``reduce``;
- the store (``pipeline/cache/store/``) lays a set's features out as ``array_shape(N, K)`` and
  keeps a per-element mean/std of ``shape``;
- the consumers (target readers, the DRA head and loss) read ``(B, *shape)`` rows, size the head
  with ``size`` and compare ``flat`` vectors.

A new target mode adds a ``Pooling`` member and its ``reduce`` branch here, and whatever
produces or consumes it; the store and the readers follow ``shape``.

Two kinds of target, and what the DRA loss compares (``pipeline/train/losses.py:dra_loss``):

- **vectors** (``mean``: (C,); ``flatten``: (C*H*W,)): ONE cosine per (sample, view). With
  ``flatten`` that is one cosine over the whole C x H x W map, not a per-location comparison.
- **grids** (``grid4``: (C, 4, 4), ``grid7``: (C, 7, 7)): the block's map average-pooled
  (adaptively) to a G x G grid; the loss is REPA's, the mean over the G*G locations of a cosine
  over the C channels at each location (sihyun-yu/REPA ``loss.py``), and the head predicts a
  C-vector per location (``pipeline/train/model.py:MapHead``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch
import torch.nn.functional as F

from pipeline.core.errors import UserError

DTYPE = "float16"  # what the cache stores (the loss runs in float32)


class Pooling(str, Enum):
    mean = "mean"  # average over the spatial dimensions: (C,)
    flatten = "flatten"  # the whole feature map: (C*H*W,), compared by ONE cosine over the whole map
    grid4 = "grid4"  # adaptive average pooling to a 4 x 4 grid: (C, 4, 4), compared per location (REPA)
    grid7 = "grid7"  # adaptive average pooling to a 7 x 7 grid: (C, 7, 7), compared per location (REPA)


GRID = {Pooling.grid4: 4, Pooling.grid7: 7}  # grid poolings -> G (the target is (C, G, G))


def reduce(pooling: Pooling, h: torch.Tensor) -> torch.Tensor:
    """The producer's side of each pooling mode: a block's output -> float32 (B, *target shape)."""
    h = h.float()
    if pooling in GRID:
        if h.ndim != 4:
            raise ValueError(f"pooling {pooling.value} needs a (B, C, H, W) feature map, got shape {tuple(h.shape)}")
        return F.adaptive_avg_pool2d(h, GRID[pooling])
    if h.ndim == 2:
        return h
    return h.mean(dim=(2, 3)) if pooling is Pooling.mean else h.flatten(1)


@dataclass(frozen=True)
class TargetSpec:
    t: int
    layer: str
    pooling: Pooling
    shape: tuple[int, ...]  # of one (sample, view) target

    @property
    def name(self) -> str:
        """The set's name in the store (its group under each part's ``targets``)."""
        return f"t{self.t}-{self.layer}"

    @property
    def grid(self) -> int | None:
        """G of a grid target (C, G, G), compared per location; None for a vector target."""
        return GRID.get(self.pooling)

    @property
    def channels(self) -> int:
        """What one location holds: C of a grid target, the whole size of a vector one."""
        return self.shape[0] if self.grid else self.size

    @property
    def size(self) -> int:
        """Numbers per target: the DRA head's output width."""
        return math.prod(self.shape)

    def array_shape(self, n: int, k: int) -> tuple[int, ...]:
        """The features array of a part with N samples and K views."""
        return (n, k, *self.shape)

    def nbytes(self, n: int, k: int) -> int:
        return n * k * self.size * 2

    @staticmethod
    def flat(x: torch.Tensor) -> torch.Tensor:
        """(B, *shape) -> (B, size): what the head predicts and the loss compares."""
        return x.reshape(len(x), -1)

    def to_attrs(self) -> dict[str, Any]:
        return {"name": self.name, "t": self.t, "layer": self.layer, "pooling": self.pooling.value,
                "shape": list(self.shape)}

    @classmethod
    def from_attrs(cls, attrs: Any) -> TargetSpec:
        """The spec of one recorded target set; anything malformed is one UserError line."""
        try:
            if not isinstance(attrs, dict) or not isinstance(attrs.get("shape"), list) \
                    or not isinstance(attrs.get("t"), int) or isinstance(attrs.get("t"), bool):
                raise TypeError
            spec = cls(attrs["t"], str(attrs["layer"]), Pooling(attrs["pooling"]), tuple(int(s) for s in attrs["shape"]))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"malformed target specification in the cache: {str(attrs)[:200]}") from None
        grid_ok = spec.grid is None or (len(spec.shape) == 3 and spec.shape[1:] == (spec.grid, spec.grid))
        if not spec.shape or min(spec.shape) < 1 or attrs.get("name") != spec.name or not grid_ok:
            raise UserError(f"malformed target specification in the cache: {str(attrs)[:200]}")
        return spec


def targets_attrs(specs: Sequence[TargetSpec]) -> dict[str, Any]:
    """Root attributes of a store holding ``specs``; the first is the default set."""
    return {"targets": [s.to_attrs() for s in specs], "default_target": specs[0].name}


def targets_from_attrs(attrs: dict) -> tuple[list[TargetSpec], TargetSpec]:
    """(every target set, the default one) a store records; malformed lists are one UserError line."""
    raw = attrs.get("targets")
    if not isinstance(raw, list) or not raw:
        raise UserError("malformed target specification in the cache: no list of target sets")
    specs = [TargetSpec.from_attrs(a) for a in raw]
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise UserError(f"malformed target specification in the cache: a target set is listed twice ({names})")
    default = attrs.get("default_target")
    if default not in names:
        raise UserError(f"malformed target specification in the cache: default {default!r} is not one of {names}")
    return specs, specs[names.index(default)]


def select(specs: Sequence[TargetSpec], default: TargetSpec, t: int | None = None,
           layer: str | None = None) -> TargetSpec:
    """The set at (t, layer); either left out (None, or layer "") means the default's."""
    want_t = default.t if t is None else int(t)
    want_layer = layer or default.layer
    for s in specs:
        if (s.t, s.layer) == (want_t, want_layer):
            return s
    held = ", ".join(f"t={s.t} layer={s.layer}" for s in specs)
    raise UserError(f"the cache holds no target set t={want_t} layer={want_layer}; it holds: {held} "
                    f"(extract it with `python -m pipeline extract --t ... --layer ...`)")


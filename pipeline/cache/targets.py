"""The target specification: what each (sample, view) row of a cache part holds.

A target is the diffusion model's activation of block ``layer`` at timestep ``t`` for one
augmented view, reduced by ``pooling`` to an array of ``shape`` and stored as float16. The spec
is recorded in the cache (root attributes ``t``, ``layer``, ``pooling``, ``target_shape``) and is
the one place that knows a target's shape:

- the producer (``FeatureExtractor``) reduces a block's output with ``reduce``;
- the store (``pipeline/cache/store.py``) lays features out as ``array_shape(N, K)`` and keeps a
  per-element mean/std of ``shape``;
- the consumers (target readers, the DRA head and loss) read ``(B, *shape)`` rows, size the head
  with ``size`` and compare ``flat`` vectors.

A new target mode (a spatial map, several blocks) adds a ``Pooling`` member and its ``reduce``
branch here, and whatever produces or consumes it; the store and the readers follow ``shape``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from enum import Enum
from typing import Any

import torch

from pipeline.core.errors import UserError

DTYPE = "float16"  # what the cache stores (the loss runs in float32)


class Pooling(str, Enum):
    mean = "mean"  # average over the spatial dimensions: (C,)
    flatten = "flatten"  # the whole feature map: (C*H*W,)


def reduce(pooling: Pooling, h: torch.Tensor) -> torch.Tensor:
    """The producer's side of each pooling mode: a block's output -> float32 (B, *target shape)."""
    h = h.float()
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
    def size(self) -> int:
        """Numbers per target: the DRA head's output width."""
        return math.prod(self.shape)

    def array_shape(self, n: int, k: int) -> tuple[int, ...]:
        """The features array of a part with N samples and K views."""
        return (n, k, *self.shape)

    def nbytes(self, n: int, k: int) -> int:
        return n * k * self.size * 2

    def reduce(self, h: torch.Tensor) -> torch.Tensor:
        """A block's output (B, C, H, W) (or (B, C)) -> float32 targets (B, *shape)."""
        return reduce(self.pooling, h)

    @staticmethod
    def flat(x: torch.Tensor) -> torch.Tensor:
        """(B, *shape) -> (B, size): what the head predicts and the loss compares."""
        return x.reshape(len(x), -1)

    def to_attrs(self) -> dict[str, Any]:
        """Root attributes; ``target_shape`` only for targets of more than one axis (a pooled (D,)
        target is what format 2 has always held: its D is each part's ``d``), so pooled stores stay
        byte-identical to those written before the spec existed."""
        attrs: dict[str, Any] = {"t": self.t, "layer": self.layer, "pooling": self.pooling.value}
        if len(self.shape) != 1:
            attrs["target_shape"] = list(self.shape)
        return attrs

    @classmethod
    def from_attrs(cls, attrs: dict, *, fallback_d: int | None = None) -> TargetSpec:
        """The spec a store records; without ``target_shape`` the rows are pooled (D,) vectors
        (``fallback_d``: the parts' D). Malformed values are one UserError line."""
        shape = attrs.get("target_shape", [fallback_d] if fallback_d is not None else None)
        try:
            if not isinstance(shape, list):
                raise TypeError
            spec = cls(int(attrs["t"]), str(attrs["layer"]), Pooling(attrs["pooling"]), tuple(int(s) for s in shape))
        except (KeyError, TypeError, ValueError):
            raise UserError(f"malformed target specification in the cache: t={attrs.get('t')!r}, "
                            f"layer={attrs.get('layer')!r}, pooling={attrs.get('pooling')!r}, shape={shape!r}") from None
        if not spec.shape or min(spec.shape) < 1:
            raise UserError(f"malformed target shape in the cache: {list(spec.shape)}")
        return spec

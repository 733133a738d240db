"""Replayable augmentations: sample view parameters once, apply recorded parameters anywhere.

A view of an image is fully described by three integers: the crop offsets ``dx, dy`` in
``[0, 2*pad]`` into the zero-padded image and ``flip`` (0/1, horizontal, applied after the crop).
Stage one samples and records them; stage two replays exactly the same transform, so the target
``features[n, k]`` always belongs to the view the classifier sees. By default view 0 is the
identity; ``sample_views(..., identity_first=False)`` draws all K uniformly from the view space.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.core.errors import UserError


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation family whose parameters each cached view records.

    A view is a random crop of the zero-padded image (offsets dx, dy in [0, 2*pad]) followed by
    an optional horizontal flip. dx = dy = pad, flip = 0 is the identity.
    """

    pad: int = 2  # crop offsets 0..2*pad into the zero-padded image
    flip: bool = True  # random horizontal flips too

    # the cache records dx, dy as int8 (offsets 0..2*pad): a larger pad would wrap around
    MAX_PAD = 63

    def validate(self) -> None:
        if not 0 <= self.pad <= self.MAX_PAD:
            raise UserError(f"--view-pad must be in [0, {self.MAX_PAD}] (crop offsets 0..2*pad are stored as "
                            f"int8), got {self.pad}")

    @property
    def n_views(self) -> int:
        """Distinct views: (2 pad + 1)^2 crop offsets, times 2 with flips (50 at pad 2, 162 at 4)."""
        return (2 * self.pad + 1) ** 2 * (2 if self.flip else 1)

    def to_dict(self) -> dict:
        return {"kind": "pad-crop-flip", "pad": self.pad, "flip": self.flip, "fill": 0}


@dataclass(frozen=True)
class ViewRequest:
    """The view spec a reader of a cache asks for (train's ``--view-pad``, ``--view-flip``): a field
    left unset is the cache's, a field given must equal the cache's (a CIFAR cache at pad 4 trains
    without repeating it)."""

    pad: int | None = None  # crop offsets 0..2*pad into the zero-padded image (unset: the cache's)
    flip: bool | None = None  # random horizontal flips too (unset: the cache's)

    def validate(self) -> None:
        if self.pad is not None:
            ViewSpec(pad=self.pad).validate()

    def given(self) -> dict:
        """The fields set, as in ``ViewSpec.to_dict`` (what the cache's spec must match)."""
        return {k: v for k, v in (("pad", self.pad), ("flip", self.flip)) if v is not None}


def spec_from_dict(d: object) -> ViewSpec:
    """The ViewSpec a cache records (``to_dict``); anything else is refused in one line."""
    if (not isinstance(d, dict) or d.get("kind") != "pad-crop-flip" or type(d.get("pad")) is not int
            or type(d.get("flip")) is not bool or d.get("fill") != 0):
        raise UserError(f"view spec {d!r} is not a pad-crop-flip spec this version reads")
    spec = ViewSpec(pad=d["pad"], flip=d["flip"])
    spec.validate()
    return spec


def record_problem(views: dict[str, np.ndarray], spec: ViewSpec) -> str | None:
    """Why recorded views (dx, dy, flip) are not views of ``spec``, or None. An offset outside
    [0, 2*pad] would crop outside the padded image (wrapping around, or failing mid-step)."""
    hi = 2 * spec.pad
    for key in ("dx", "dy"):
        v = views[key]
        if v.size and (int(v.min()) < 0 or int(v.max()) > hi):
            return f"{key} values {int(v.min())}..{int(v.max())} outside the view spec's 0..{hi} (pad {spec.pad})"
    f = views["flip"]
    if f.size and (int(f.min()) < 0 or int(f.max()) > (1 if spec.flip else 0)):
        return f"flip values {int(f.min())}..{int(f.max())} where the view spec allows {'0..1' if spec.flip else '0'}"
    return None


def to_float01(images: np.ndarray | torch.Tensor) -> torch.Tensor:
    """uint8 images (N, H, W, C) -> float32 (N, C, H, W) in [0, 1] (the classifier's and the cache's input)."""
    x = torch.from_numpy(np.ascontiguousarray(images)) if isinstance(images, np.ndarray) else images
    return x.permute(0, 3, 1, 2).float().div_(255)


def sample_views(n: int, k: int, spec: ViewSpec, seed: int, identity_first: bool = True) -> dict[str, np.ndarray]:
    """Draw K views for each of N samples: arrays dx, dy, flip of shape (N, K), int8/uint8.

    ``identity_first`` (the default, the recorded behaviour of every existing cache): view 0 of
    every sample is the identity (centre crop, no flip) and views 1..K-1 are drawn independently
    (offsets uniform, a fair flip; repeats possible). At K = 4 a quarter of all training draws are
    then the unaugmented image, against 1 / n_views under standard augmentation.

    ``identity_first=False``: K **distinct** views drawn uniformly without replacement from the
    ``n_views`` of the view space, in random order (K > n_views: whole random permutations of the
    view space, repeated, so every view appears K // n_views or one more times). Every slot k, and
    so every training draw, is then a uniform draw from the view space: the identity has frequency
    1 / n_views, as under standard augmentation, and appears in a sample's K views by chance only.
    """
    rng = np.random.default_rng(seed)
    if not identity_first:
        table = _view_table(spec)  # (V, 3): the identity first, as all_views
        v = len(table)
        idx = np.empty((n, k), dtype=np.int64)
        step = max(1, (1 << 22) // max(v, 1))  # rows per block: the (rows, V) random keys stay ~32 MiB
        for a in range(0, n, step):
            rows = min(step, n - a)
            perms = [rng.random((rows, v)).argsort(axis=1) for _ in range(-(-k // v))]
            idx[a:a + rows] = np.concatenate(perms, axis=1)[:, :k]
        return {key: table[idx, i].astype(dt)
                for i, (key, dt) in enumerate((("dx", np.int8), ("dy", np.int8), ("flip", np.uint8)))}
    out = {}
    for key, high, dt, first in (("dx", 2 * spec.pad + 1, np.int8, spec.pad), ("dy", 2 * spec.pad + 1, np.int8, spec.pad),
                                 ("flip", 2 if spec.flip else 0, np.uint8, 0)):
        # drawn as int64 (the recorded stream) and narrowed at once: one int64 (N, K) array at a time
        out[key] = rng.integers(0, high, size=(n, k), dtype=np.int64).astype(dt) if high else np.zeros((n, k), dt)
        out[key][:, 0] = first
    return out


def _view_table(spec: ViewSpec) -> np.ndarray:
    """(V, 3) int64 rows (dx, dy, flip) of every distinct view: the identity first, then the others
    in lexicographic (flip, dy, dx) order."""
    side = range(2 * spec.pad + 1)
    identity = (spec.pad, spec.pad, 0)
    rest = [(dx, dy, f) for f in ((0, 1) if spec.flip else (0,)) for dy in side for dx in side
            if (dx, dy, f) != identity]
    return np.array([identity, *rest], dtype=np.int64)


def all_views(n: int, spec: ViewSpec) -> dict[str, np.ndarray]:
    """Every distinct view of ``spec`` for each of N samples: arrays dx, dy, flip of shape (N, V).

    One fixed order for every sample: the identity (dx = dy = pad, no flip) first, then all others
    in lexicographic (flip, dy, dx) order. Drawing a view index uniformly from these is exactly
    the standard augmentation: offsets uniform in [0, 2 pad], an independent fair flip.
    """
    table = _view_table(spec)  # (V, 3)
    return {key: np.ascontiguousarray(np.broadcast_to(table[:, i].astype(dt), (n, len(table))))
            for i, (key, dt) in enumerate((("dx", np.int8), ("dy", np.int8), ("flip", np.uint8)))}


def fresh_views(b: int, spec: ViewSpec, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """B freshly drawn views (dx, dy, flip) of the standard augmentation (not from a cache)."""
    dx = rng.integers(0, 2 * spec.pad + 1, b)
    dy = rng.integers(0, 2 * spec.pad + 1, b)
    flip = rng.integers(0, 2, b) if spec.flip else np.zeros(b, np.int64)
    return torch.from_numpy(dx), torch.from_numpy(dy), torch.from_numpy(flip)


def apply_views(images: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, flip: torch.Tensor,
                pad: int) -> torch.Tensor:
    """Apply recorded views to a batch. images (B, C, H, W) float; dx, dy, flip (B,) integers.

    Batched on the images' device: zero-pad, gather each sample's crop, flip where asked.
    """
    b, c, h, w = images.shape
    dev = images.device
    padded = F.pad(images, (pad, pad, pad, pad))
    rows = dy.to(dev, torch.long)[:, None] + torch.arange(h, device=dev)[None, :]  # (B, H)
    cols = dx.to(dev, torch.long)[:, None] + torch.arange(w, device=dev)[None, :]  # (B, W)
    idx_b = torch.arange(b, device=dev)[:, None, None]
    out = padded.permute(0, 2, 3, 1)[idx_b, rows[:, :, None], cols[:, None, :]]  # (B, H, W, C)
    out = out.permute(0, 3, 1, 2)
    flip = flip.to(dev, torch.bool)[:, None, None, None]
    return torch.where(flip, out.flip(-1), out).contiguous()


def apply_view_reference(image: np.ndarray, dx: int, dy: int, flip: int, pad: int) -> np.ndarray:
    """One image (H, W, C) with plain numpy: the readable definition ``apply_views`` must equal."""
    h, w = image.shape[:2]
    padded = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))
    crop = padded[dy:dy + h, dx:dx + w]
    return crop[:, ::-1] if flip else crop

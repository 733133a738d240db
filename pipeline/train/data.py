"""Images + cached targets for training, joined by key, with augmentation-consistent indexing.

``load_part`` reads the image shards a cache part names, refuses anything that does not match
the cache (``cache.check_against`` plus a join by key), and keeps everything a batch needs in
memory except the features, which a target reader serves (in RAM or streamed).

``assemble`` turns a sampled batch of (row, view) pairs into classifier inputs: image n of row n,
the recorded transform of view k replayed on it (``views.apply_views``), and ``features[n, k]`` as
its target. Important: image, view parameters, noise seed and target are all indexed by the same
(row, view) pair, so an image is never paired with another view's target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.core.errors import UserError
from pipeline.core.shards import ShardSet, read_split
from pipeline.core.views import ViewSpec, apply_views, fresh_views
from pipeline.train.sampler import Batch, InMemoryTargets, StreamingTargets


@dataclass
class PartData:
    name: str
    n: int  # rows used (real_limit applied)
    k: int
    images: torch.Tensor  # uint8 (n, C, H, W), row i = the image of cache row i
    labels: torch.Tensor  # int64 (n,)
    dx: torch.Tensor  # (n, K) recorded views
    dy: torch.Tensor
    flip: torch.Tensor
    noise_seed: torch.Tensor  # (n, K) int64
    reader: Any = None  # InMemoryTargets | StreamingTargets | None (no DRA or online)


def join_by_key(cache_keys: list[str], shards: ShardSet) -> np.ndarray:
    """Shard index of every cache key; refuses keys the shards do not hold."""
    index = shards.index_of()
    missing = [k for k in cache_keys if k not in index]
    if missing:
        raise UserError(f"{shards.path}: {len(missing)} sample keys of the cache are not in these shards "
                        f"(first: {missing[0]})")
    return np.fromiter((index[k] for k in cache_keys), np.int64, len(cache_keys))


def load_part(cache: Any, name: str, *, shards_dir: str, limit: int, view_spec: dict,
              image_size: int | None, target: Any = None) -> tuple[PartData, Any]:
    """Images and view records of one cache part, checked against the cache. No features yet
    (``target``: the target set the returned part reads; default: the cache's default set)."""
    part = cache.part(name, target)
    path = shards_dir or part.shards
    if not path:
        raise UserError(f"{cache.url}: part {name!r} does not record its image shards; pass the folder")
    try:  # the cache covers the first part.n samples of the split (check_against proves it)
        ss = read_split(path, limit=part.n)
    except UserError as exc:
        raise UserError(f"image shards of cache part {name!r}: {exc}") from None
    cache.check_against(name, ss, view_spec=view_spec, image_size=image_size)
    n = part.n if limit <= 0 else min(limit, part.n)
    idx = join_by_key(part.keys[:n], ss)
    labels = ss.labels[idx]
    if not np.array_equal(labels, np.asarray(part.labels[:n])):
        raise UserError(f"{path}: labels differ from the cache's labels for the same keys")
    images = torch.from_numpy(np.ascontiguousarray(ss.images[idx].transpose(0, 3, 1, 2)))
    v = part.views
    data = PartData(name, n, part.k, images, torch.from_numpy(labels),
                    *(torch.from_numpy(np.asarray(v[key][:n]).astype(np.int64)) for key in ("dx", "dy", "flip")),
                    torch.from_numpy(np.asarray(part.noise_seed[:n], np.int64)))
    return data, part


def feature_bytes(part: Any, n: int) -> int:
    return n * part.k * part.d * 2  # float16 rows of d = TargetSpec.size numbers


def target_reader(part: Any, rows: int, *, stream: bool, window: int) -> InMemoryTargets | StreamingTargets:
    """The first ``rows`` rows of a cache part's targets: in RAM (one float16 gather per batch) or
    streamed (an LRU of 2 shuffle windows of chunks)."""
    return StreamingTargets(part, capacity=2 * window + 2) if stream else InMemoryTargets(part, rows=rows)


def _views(data: PartData, rows: np.ndarray, views: np.ndarray, pad: int,
           fresh: tuple[ViewSpec, np.random.Generator] | None = None) -> dict[str, torch.Tensor]:
    r, v = torch.from_numpy(rows), torch.from_numpy(views)
    x = data.images[r].float().div_(255)
    if fresh is None:
        x = apply_views(x, data.dx[r, v], data.dy[r, v], data.flip[r, v], pad)
    else:  # on-the-fly augmentation: views no cache holds (no target belongs to them)
        x = apply_views(x, *fresh_views(len(rows), fresh[0], fresh[1]), pad)
    out = {"x": x, "y": data.labels[r], "seed": data.noise_seed[r, v]}
    if data.reader is not None:
        out["target"] = torch.from_numpy(data.reader.get(rows, views))
    return out


def assemble(batch: Batch, real: PartData, synthetic: PartData | None, pad: int,
             fresh: tuple[ViewSpec, int] | None = None) -> dict[str, torch.Tensor]:
    """Inputs of one step: x (B,C,H,W) augmented views, y, noise seed, and (cached) target float16.

    ``fresh`` = (view spec, seed): draw a new random view per sample instead of a recorded one,
    from a generator seeded by (seed, epoch, step), so a resumed run draws the same views.
    """
    draw = (fresh[0], np.random.default_rng([fresh[1], batch.epoch, batch.step])) if fresh else None
    parts = [_views(real, batch.real_rows, batch.real_views, pad, draw)]
    if synthetic is not None and len(batch.syn_rows):
        parts.append(_views(synthetic, batch.syn_rows, batch.syn_views, pad, draw))
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}

"""Images + cached targets for training, joined by key, with augmentation-consistent indexing.

``load_part`` opens what one cache part's rows need: the images and the per-row view records. A
part extracted with its images (the default) serves them from the cache, after checking them
against the image split's per-shard content hashes: in RAM, or streamed chunk by chunk with the
targets of the same rows. Where the split the cache records is not reachable (a store shared or
moved alone), the stored images are used as they are, vouched for by the store's manifest and
digest only (``PartData.image_check`` says which check held, ``image_note`` says it in one line).
A part without them reads the image shards it names into RAM, refused unless they match the
cache (``cache.check_against`` plus a join by key). The features come from
a target reader (in RAM or streamed). ``plan_memory`` decides what streams: everything, once
images and features together exceed the memory budget.

``assemble`` turns a sampled batch of (row, view) pairs into classifier inputs: image n of row n,
the recorded transform of view k replayed on it (``views.apply_views``), and ``features[n, k]`` as
its target. Important: image, view parameters, noise seed and target are all indexed by the same
(row, view) pair, so an image is never paired with another view's target.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from pipeline.cache.store import CachePart, FeatureCache
from pipeline.cache.targets import TargetSpec
from pipeline.core.errors import UserError
from pipeline.core.shards import (
    ShardSet,
    content_hash,
    iter_shards,
    read_fingerprint,
    read_split,
    shards_digest,
    split_exists,
)
from pipeline.core.views import ViewSpec, apply_views, fresh_views
from pipeline.train.readers import InMemoryImages, InMemoryTargets, StreamingImages, StreamingTargets
from pipeline.train.sampler import Batch
from pipeline.train.step import pca_whitening

WINDOW = 4  # chunks per shuffle window when streaming (the readers keep two windows)
CHECK_ROWS = 4096  # rows per read while the stored images are hashed (bounded memory)
SHARDS_FLAG = {"train": "--real-shards", "synthetic": "--synthetic-shards"}  # train's flag per part
# how a part's images were checked: against the split's per-shard records; by the store's manifest and
# digest only (split not reachable); read from the split itself (no stored images); not at all (--no-verify)
IMAGE_CHECKS = ("split", "store", "shards", "off")


@dataclass
class PartData:
    name: str
    n: int  # rows used (real_limit applied)
    k: int
    images: InMemoryImages | StreamingImages  # row i = the image of cache row i, uint8 (B, C, H, W) per get
    labels: torch.Tensor  # int64 (n,)
    dx: np.ndarray  # (n, K) recorded views, in the cache's compact dtypes (int8, int8, uint8)
    dy: np.ndarray
    flip: np.ndarray
    noise_seed: np.ndarray  # (n, K) int64
    reader: Any = None  # InMemoryTargets | StreamingTargets | None (no DRA or online)
    image_check: str = "split"  # one of IMAGE_CHECKS
    shards: str = ""  # the image split checked against or read ("" when not reachable)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(C, H, W)."""
        return self.images.shape


def join_by_key(cache_keys: list[str], shards: ShardSet) -> np.ndarray:
    """Shard index of every cache key; refuses keys the shards do not hold."""
    index = shards.index_of()
    missing = [k for k in cache_keys if k not in index]
    if missing:
        raise UserError(f"{shards.path}: {len(missing)} sample keys of the cache are not in these shards "
                        f"(first: {missing[0]})")
    return np.fromiter((index[k] for k in cache_keys), np.int64, len(cache_keys))


def check_stored_images(part: CachePart, path: str, fp: dict, n: int) -> None:
    """The images, keys and labels a cache part stores for rows [0, n) are the split's.

    The split's fingerprint lists its shards with a content hash each (keys, pixels, labels); the
    cache's fingerprint of the split was compared already (``check_fingerprint``). Each shard
    that [0, n) reaches is hashed from the cache's rows, read a few thousand at a time (the whole
    shard, when the cache holds it whole); a shard the cache cuts (or without a content record) is
    read from the split and compared row by row. Memory: one shard at most.
    """
    records = fp.get("shards")
    if not isinstance(records, list) or fp.get("shards_digest") != shards_digest(records):
        raise UserError(f"{path}: the shard records differ from the fingerprint's shards_digest")
    a = 0
    for rec in records:
        if a >= n:
            break
        count = rec.get("count") if isinstance(rec, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise UserError(f"{path}: malformed shard record in the fingerprint: {str(rec)[:120]}")
        b = a + count
        # a shard the cache holds whole is hashed from its rows, even when n cuts it: the split's
        # tar is read only for a shard the cache itself cuts (extract --limit)
        whole = b <= part.n and isinstance(rec.get("content"), str)
        if whole:
            blocks = (part.read_images(x, min(x + CHECK_ROWS, b)) for x in range(a, b, CHECK_ROWS))
            same = content_hash(part.read_keys(a, b), blocks, np.asarray(part.labels[a:b])) == rec["content"]
        else:
            keys, images, labels = next(iter_shards(path, [rec]))
            m = min(b, n) - a
            same = (keys[:m] == part.read_keys(a, a + m) and np.array_equal(labels[:m], part.labels[a:a + m])
                    and np.array_equal(images[:m], part.read_images(a, a + m)))
        if not same:
            raise UserError(f"{part.name} rows {a}..{b if whole else min(b, n)}: the images, keys or labels the cache "
                            f"stores differ from {path}/{rec.get('name')}; refusing the cache")
        a = b


def image_note(name: str, data: PartData, digest: str, flag: str = "") -> str | None:
    """One line saying which guarantee a part's stored images have when their split was not
    reachable (None otherwise). ``flag``: what names the split (default: train's flag)."""
    if data.image_check != "store":
        return None
    flag = flag or SHARDS_FLAG.get(name, "the split's folder")
    return (f"note: cache part {name!r}: its image split is not reachable here; using the images the cache "
            f"stores, vouched for only by the store's manifest and digest {digest[:16]}...: compare the digest "
            f"with one from a channel you trust (`cache verify --digest`), or pass {flag} to check them "
            "against their split")


def _split_fingerprint(cache: FeatureCache, name: str, path: str, *, given: bool) -> dict | None:
    """The fingerprint of the image split at ``path``; None when the split the cache records is not
    reachable and the part stores its images (a store shared or moved alone). A split the user
    names (``given``) must be there."""
    part = cache.part(name)
    if part.has_images and not given and (not path or not split_exists(path)):
        return None
    if not path:
        raise UserError(f"{cache.url}: part {name!r} does not record its image shards; pass them with "
                        f"{SHARDS_FLAG.get(name, 'the split folder')}")
    if not split_exists(path):
        stored = "" if part.has_images else " and the cache stores no images of this part (extracted with --no-images)"
        raise UserError(f"image shards of cache part {name!r}: {path} is not a complete shard set (no "
                        f"fingerprint.json){stored}; pass the split the cache was extracted from with "
                        f"{SHARDS_FLAG.get(name, 'its shards folder')}")
    return read_fingerprint(path)  # a malformed one is its own error line


def load_part(cache: FeatureCache, name: str, *, shards_dir: str, limit: int, view_spec: dict | None,
              image_size: int | None, target: TargetSpec | None = None, stream: bool = False,
              verify: bool = True) -> tuple[PartData, Any]:
    """Images and view records of one cache part, checked against the cache. No features yet
    (``target``: the target set the returned part reads; default: the cache's default set).

    A part that stores its images: ``verify`` hashes them against the split's records first (off:
    trust the store; split not reachable and not ``shards_dir``: the store's manifest and digest
    vouch for them), then ``stream`` reads them chunk by chunk (else all n into RAM).
    ``view_spec``: the fields a user asked for (each must be the cache's)."""
    part = cache.part(name, target)
    path = shards_dir or part.shards
    n = part.n if limit <= 0 else min(limit, part.n)
    v = part.views
    views = [np.asarray(v[key][:n]) for key in ("dx", "dy", "flip")]
    seeds = np.asarray(part.noise_seed[:n], np.int64)
    fp = _split_fingerprint(cache, name, path, given=bool(shards_dir))
    if part.has_images:
        if fp is None:  # the store's own manifest and digest are all that vouch for its images
            cache.check_setup(view_spec=view_spec, image_size=image_size)
            path = ""
        else:
            cache.check_fingerprint(name, fp, path, view_spec=view_spec, image_size=image_size)
            if verify:
                check_stored_images(part, path, fp, n)
        check = "off" if not verify else "store" if fp is None else "split"
        labels = torch.from_numpy(np.asarray(part.labels[:n], np.int64))
        images = StreamingImages(part, capacity=reader_capacity()) if stream else InMemoryImages(_read_all(part, n))
        return PartData(name, n, part.k, images, labels, *views, seeds, image_check=check, shards=path), part
    try:  # the cache covers the first part.n samples of the split (check_against proves it)
        ss = read_split(path, limit=part.n)
    except UserError as exc:
        raise UserError(f"image shards of cache part {name!r}: {exc}") from None
    cache.check_against(name, ss, view_spec=view_spec, image_size=image_size)
    idx = join_by_key(part.keys[:n], ss)
    labels = ss.labels[idx]
    if not np.array_equal(labels, np.asarray(part.labels[:n])):
        raise UserError(f"{path}: labels differ from the cache's labels for the same keys")
    images = InMemoryImages(torch.from_numpy(np.ascontiguousarray(ss.images[idx].transpose(0, 3, 1, 2))))
    return PartData(name, n, part.k, images, torch.from_numpy(labels), *views, seeds, image_check="shards",
                    shards=path), part


def unaugmented(data: PartData, pad: int) -> PartData:
    """The part read in view 0 only (``train --no-augment``), refused unless every used row's view 0 is
    the identity (offset (pad, pad), no flip): otherwise "no augmentation" would be one fixed random
    crop per image."""
    ok = (data.dx[:, 0] == pad) & (data.dy[:, 0] == pad) & (data.flip[:, 0] == 0)
    if not ok.all():
        raise UserError(f"--no-augment reads each sample's view 0, but in cache part {data.name!r} view 0 is "
                        f"not the unaugmented image for {int((~ok).sum())} of {data.n} rows (extract with "
                        f"--views all or --view-draw identity-first)")
    return replace(data, k=1)


def _read_all(part: CachePart, n: int) -> torch.Tensor:
    """The first n stored images as uint8 (n, C, H, W), filled block by block (no second copy)."""
    h, w, c = part.image_shape
    out = torch.empty((n, c, h, w), dtype=torch.uint8)
    for a in range(0, n, CHECK_ROWS):
        out[a:a + CHECK_ROWS] = torch.from_numpy(part.read_images(a, min(a + CHECK_ROWS, n))).permute(0, 3, 1, 2)
    return out


def target_sample(part: CachePart, n: int, *, max_rows: int = 4096, seed: int = 0) -> np.ndarray:
    """Targets (M, *shape) of at most ``max_rows`` of the first ``n`` rows (one random view each,
    seeded): what ``--target-norm pca`` estimates the train targets' covariance from."""
    rng = np.random.default_rng([seed, 11])
    rows = np.sort(rng.choice(n, min(n, max_rows), replace=False))
    return part.read(rows, rng.integers(0, part.k, len(rows)))


def target_whitening(part: CachePart, n: int) -> torch.Tensor:
    """``--target-norm pca``'s whitening of the first ``n`` rows' targets (``target_sample``): one
    function, so that train and ``api.CacheDataset`` draw the same rows and get the same matrix."""
    return pca_whitening(target_sample(part, n), part.mean)


def feature_bytes(part: CachePart, n: int) -> int:
    return n * part.k * part.d * 2  # float16 rows of d = TargetSpec.size numbers


def image_bytes(part: CachePart, n: int) -> int:
    """uint8 pixels of the first n rows (the shape the split's fingerprint records)."""
    return n * int(np.prod(part.fingerprint.image_shape or [0]))


def target_reader(part: CachePart, rows: int, *, stream: bool, window: int = WINDOW) -> InMemoryTargets | StreamingTargets:
    """The first ``rows`` rows of a cache part's targets: in RAM (one float16 gather per batch) or
    streamed (an LRU of 2 shuffle windows of chunks)."""
    return StreamingTargets(part, capacity=reader_capacity(window)) if stream else InMemoryTargets(part, rows=rows)


def reader_capacity(window: int = WINDOW) -> int:
    """Chunks a streaming reader keeps: two shuffle windows (and one spare each side), so the
    chunk-aware order reads every chunk once per pass."""
    return 2 * window + 2


def plan_memory(parts: dict[str, tuple[Any, int]], *, features: bool, budget_mb: int) -> tuple[bool, list[str]]:
    """Whether a run streams (images and features alike), and a note per part that cannot stream
    its images (extracted without them: held in RAM from the shards).

    ``parts``: name -> (cache part, rows used); ``features``: the run reads cached targets. In RAM
    when images (+ features) of every part fit ``budget_mb`` (0: always stream).
    """
    used = sum(image_bytes(p, n) + (feature_bytes(p, n) if features else 0) for p, n in parts.values())
    stream = budget_mb == 0 or used > budget_mb * 2**20
    notes = [f"note: cache part {name!r} stores no images (extracted with --no-images): its "
             f"{image_bytes(p, n) / 2**20:.0f} MiB of images are held in RAM, read from the shards"
             for name, (p, n) in parts.items() if stream and not p.has_images]
    return stream, notes


def _views(data: PartData, rows: np.ndarray, views: np.ndarray, pad: int,
           fresh: tuple[ViewSpec, np.random.Generator] | None = None) -> dict[str, torch.Tensor]:
    x = data.images.get(rows).float().div_(255)
    if fresh is None:
        x = apply_views(x, *(torch.from_numpy(a[rows, views].astype(np.int64)) for a in (data.dx, data.dy, data.flip)),
                        pad)
    else:  # on-the-fly augmentation: views no cache holds (no target belongs to them)
        x = apply_views(x, *fresh_views(len(rows), fresh[0], fresh[1]), pad)
    out = {"x": x, "y": data.labels[torch.from_numpy(rows)], "seed": torch.from_numpy(data.noise_seed[rows, views])}
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

"""Stores with chosen features, for tests and the benchmark: the one place outside ``extract`` that
writes a complete cache.

``write_store`` goes through the same ``CacheWriter`` as ``extract`` (format, chunking, manifest,
digest), so what it writes opens, verifies and trains like an extracted store; only the numbers
differ: the caller gives the features (and images) instead of a diffusion model computing them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.cache.store import IMAGES, NORMALISATION, CacheWriter, PartInit
from pipeline.cache.targets import TargetSpec, targets_attrs
from pipeline.core.views import ViewSpec, sample_views

# what a part records of its image split's fingerprint (as extract's part_init does)
FINGERPRINT_KEYS = ("content_hash", "count", "shards_digest", "image_shape", "num_classes")
Rows = Callable[[int, int], np.ndarray]  # (first row, end row) -> that block of an (N, ...) array


def split_attrs(path: str, fingerprint: dict) -> dict:
    """A part's record of the image split it was made from (``shards`` path and its fingerprint)."""
    return {"shards": str(path), "fingerprint": {k: fingerprint[k] for k in FINGERPRINT_KEYS if k in fingerprint}}


def _block(source: np.ndarray | Rows, a: int, b: int) -> np.ndarray:
    return source(a, b) if callable(source) else source[a:b]


def write_store(url: str, *, keys: Sequence[str], labels: np.ndarray, k: int, targets: Sequence[TargetSpec],
                features: dict[str, np.ndarray | Rows], split: dict | None = None, images: np.ndarray | Rows | None = None,
                image_shape: tuple[int, ...] | None = None, view_spec: ViewSpec | None = None, seed: int = 0,
                noise_seed: np.ndarray | None = None, rows_per_chunk: int = 16, chunks_per_shard: int = 4,
                compressor: str = "blosc-zstd", plan: dict[str, Any] | None = None) -> str:
    """A complete one-part (``train``) store at ``url`` and return ``url``.

    ``features``: per target set name, float16 rows (N, K, *shape) or a function of a row block (so
    that nothing of size N need be held); ``images`` (uint8 (N, H, W, C) or a function) are stored
    with the part when given. Views are drawn as ``extract`` draws them (``sample_views`` with
    ``seed``); ``split`` is the part's record of its image split (``split_attrs``); ``plan`` adds to
    or overrides the root attributes.
    """
    n, view_spec = len(keys), view_spec or ViewSpec()
    if images is not None and image_shape is None:
        image_shape = tuple(_block(images, 0, 1).shape[1:])
    init = PartInit(list(keys), np.asarray(labels, np.int64), sample_views(n, k, view_spec, seed),
                    np.zeros((n, k), np.int64) if noise_seed is None else noise_seed, list(targets),
                    split if split is not None else {"shards": "", "fingerprint": {}}, image_shape)
    root = {"model": {"source": "a store written by pipeline.cache.testing"}, **targets_attrs(targets),
            "normalisation": NORMALISATION, "view_spec": view_spec.to_dict(), "seed": seed}
    if image_shape is not None:
        root |= {"image_size": int(image_shape[0]), "in_channels": int(image_shape[2])}
    w = CacheWriter.open_or_create(str(url), plan=root | (plan or {}), parts={"train": init},
                                   rows_per_chunk=rows_per_chunk, chunks_per_shard=chunks_per_shard, compressor=compressor)
    for s in w.missing_shards("train"):
        a, b = w.shard_rows("train", s)
        arrays = {spec.name: _block(features[spec.name], a, b) for spec in targets}
        if images is not None:
            arrays[IMAGES] = _block(images, a, b)
        w.write_shard("train", s, arrays)
    w.finalize_part("train")
    w.finalize({})
    return str(url)

"""Stores with chosen features, for tests and the benchmark: the one place outside ``extract`` that
writes a complete cache.

``write_store`` goes through the same ``CacheWriter`` as ``extract`` (format, chunking, manifest,
digest), so what it writes opens, verifies and trains like an extracted store; only the numbers
differ: the caller gives the features (and images) instead of a diffusion model computing them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from pipeline.cache.contract import CachePlan, Fingerprint, ModelRecord, PartRecord
from pipeline.cache.store import IMAGES, CacheWriter, PartInit
from pipeline.cache.targets import TargetSpec
from pipeline.core.views import ViewSpec, sample_views

Rows = Callable[[int, int], np.ndarray]  # (first row, end row) -> that block of an (N, ...) array
SOURCE = ModelRecord("a store written by pipeline.cache.testing")  # no diffusion model made these features


def split_record(path: str, fingerprint: dict) -> PartRecord:
    """A part's record of the image split it was made from (``shards`` path and its fingerprint)."""
    return PartRecord(str(path), Fingerprint.of_split(fingerprint), None, None)


def store_plan(sets: Sequence[TargetSpec], parts: dict[str, PartInit], *, view_spec: ViewSpec | None = None,
              image_shape: tuple[int, ...] | None = None, **fields: Any) -> CachePlan:
    """The plan of a store holding ``parts`` with target ``sets``; ``fields`` override any ``CachePlan``
    field (``targets`` too: a root that lies about its parts)."""
    h, c = (image_shape[0], image_shape[2]) if image_shape else (28, 1)
    plan = CachePlan(SOURCE, tuple(sets), int(h), int(c), view_spec or ViewSpec(), sets[0].pooling,
                     images=image_shape is not None,
                     parts={n: p.plan for n, p in parts.items()})
    return dataclasses.replace(plan, **fields)


def _block(source: np.ndarray | Rows, a: int, b: int) -> np.ndarray:
    return source(a, b) if callable(source) else source[a:b]


def write_store(url: str, *, keys: Sequence[str], labels: np.ndarray, k: int, targets: Sequence[TargetSpec],
                features: dict[str, np.ndarray | Rows], split: PartRecord | None = None, images: np.ndarray | Rows | None = None,
                image_shape: tuple[int, ...] | None = None, view_spec: ViewSpec | None = None, seed: int = 0,
                noise_seed: np.ndarray | None = None, rows_per_chunk: int = 16, chunks_per_shard: int = 4,
                compressor: str = "blosc-zstd", plan: dict[str, Any] | None = None) -> str:
    """A complete one-part (``train``) store at ``url`` and return ``url``.

    ``features``: per target set name, float16 rows (N, K, *shape) or a function of a row block (so
    that nothing of size N need be held); ``images`` (uint8 (N, H, W, C) or a function) are stored
    with the part when given. Views are drawn as ``extract`` draws them (``sample_views`` with
    ``seed``); ``split`` is the part's record of its image split (``split_record``); ``plan``
    overrides fields of the root's ``CachePlan`` (``store_plan``).
    """
    n, view_spec = len(keys), view_spec or ViewSpec()
    if images is not None and image_shape is None:
        image_shape = tuple(_block(images, 0, 1).shape[1:])
    init = PartInit(list(keys), np.asarray(labels, np.int64), sample_views(n, k, view_spec, seed),
                    np.zeros((n, k), np.int64) if noise_seed is None else noise_seed, list(targets),
                    split if split is not None else PartRecord("", Fingerprint(), None, None), image_shape)
    root = store_plan(targets, {"train": init}, view_spec=view_spec, image_shape=image_shape, seed=seed, **(plan or {}))
    w = CacheWriter.open_or_create(str(url), plan=root, parts={"train": init},
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

"""The feature cache: a sharded Zarr v3 group, the contract between stage one and stage two.

This package is the only code that imports zarr (tests/test_layout_rules.py checks it). Its public
face is below; layout, checks, writer, reader, verify and info are its parts. Layout::

    STORE/zarr.json                 root attrs: model, timesteps, layers, pooling, targets (the spec of
                                    every target set), default_target, ..., manifest, digest, "complete"
    STORE/{train,synthetic,test}/   one group per part
        keys (N,) str, labels (N,) int64, dx, dy (N, K) int8, flip (N, K) uint8,
        noise_seed (N, K) int64                       shared by every target set
        images     (N, H, W, C) uint8   optional (part attribute ``images``; train and synthetic parts
                                        by default): row i's image, chunked and sharded like the
                                        features, so training streams images with their targets
        images_progress (n_shards, 32) uint8          its resume record
        targets/t{t}-{layer}/       one group per target set (pipeline/cache/targets.py)
            features   (N, K, *shape) float16  chunks (rows_per_chunk, K, *shape), zarr shards of
                                      rows_per_chunk*chunks_per_shard rows, compressed
            mean, std  (*shape) float32
            progress   (n_shards, 32) uint8: sha256 of each written feature shard (resume record)

Invariants: a feature (or image) shard is written by exactly one ``arr[a:b] = block`` (different
processes write different shards, never the same file); its sha256 goes into ``progress``
afterwards, one chunk per shard (so writers never share a file either). Every target set of a
part has the same rows per shard, so one job computes shard ``s`` of every set that lacks it.
``complete: true`` is the last attribute written, and ``open_cache`` refuses a store without it.

Paths (relocatable stores): the root attribute ``paths: "relative-to-store"`` says that every path
the store records (each part's ``shards``, the image split it was made from; ``model.source``, the
diffusion model folder) is relative to the store itself when it starts with ``./`` or ``../``
(``../shards/real/train`` beside ``artifacts/feats.zarr``), so a store moved or copied together with
them still finds them; an absolute path, a URL of another file system or a hub id (``owner/name``)
is recorded as it is (``record_path``, ``resolve_path``). A store without the attribute (made before
it existed, same format) records paths as given to extract: relative to the folder it ran in.

Integrity (a cache is input from a stranger): at the end, ``manifest`` records the sha256 of every
file of the store but the root ``zarr.json`` (array metadata and part attributes included), and
``digest`` is the sha256 of the root attributes with the manifest (all but ``digest`` and
``complete``). ``verify_cache`` lists the files the store really holds and requires each to be in
the manifest with its checksum and every manifest entry to exist; names from the manifest are
only compared with listed names, never opened, so they cannot point outside the store; a local
file that is not a regular file (a symlink to ``/dev/zero``) is refused, not read. The digest
names the store's content: ``cache info`` prints it, training records it, and a team that got it
through a trusted channel can require it (``cache verify --digest``).
"""

from __future__ import annotations

from pipeline.cache.contract import NORMALISATION, PATHS, CacheMeta, CachePlan, PartRecord
from pipeline.cache.store.checks import check_digest_value
from pipeline.cache.store.info import cache_info, probe_table
from pipeline.cache.store.layout import (
    COMPRESSORS,
    FORMAT,
    IMAGES,
    OLD_FORMATS,
    PARTS,
    PartInit,
    attrs_digest,
    open_group,
    record_path,
    resolve_path,
    set_path,
)
from pipeline.cache.store.reader import CachePart, FeatureCache, StoreChanged, open_cache
from pipeline.cache.store.verify import recheck_cache, verify_cache
from pipeline.cache.store.writer import CacheWriter

__all__ = ["COMPRESSORS", "CachePart", "CacheMeta", "CachePlan", "CacheWriter", "FORMAT", "FeatureCache", "IMAGES", "NORMALISATION", "OLD_FORMATS", "PARTS", "PATHS", "PartInit", "PartRecord", "StoreChanged", "attrs_digest", "cache_info", "check_digest_value", "open_cache", "open_group", "probe_table", "recheck_cache", "record_path", "resolve_path", "set_path", "verify_cache"]

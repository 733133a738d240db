"""``CacheWriter``: creates or resumes a store, writes shards (features and images), finalises parts
and the store (manifest, digest, ``complete`` last)."""

from __future__ import annotations

import dataclasses
import json
import math

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.cache.contract import CachePlan
from pipeline.cache.store.layout import (
    COMPRESSORS,
    FORMAT,
    IMAGE_CODEC,
    IMAGES,
    ROOT_META,
    SMALL_CHUNK_ROWS,
    PartInit,
    _data_keys,
    _foreign_folder,
    _list_keys,
    _location,
    _raw,
    _regular_file_raw,
    _sha,
    attrs_digest,
    set_path,
)
from pipeline.cache.targets import DTYPE
from pipeline.core.errors import UserError


class CacheWriter:
    """Creates a store (or reopens one for resume), writes shards, finalises.

    ``plan`` is every root attribute known up front (``CachePlan``); a store on disk is resumed only
    if it records the same plan, so a re-run can never mix two configurations in one store.
    """

    def __init__(self, url: str, group: zarr.Group, rows_per_shard: int) -> None:
        self.url, self.group, self.rows_per_shard = url, group, rows_per_shard

    # -- creation / resume ----------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, url: str, *, plan: CachePlan, parts: dict[str, PartInit], rows_per_chunk: int,
                       chunks_per_shard: int, compressor: str, create: bool = True) -> CacheWriter:
        """Resume a store with the same plan, or create it (only where ``create``: rank 0)."""
        if compressor not in COMPRESSORS:
            raise UserError(f"unknown compressor {compressor!r}; choose one of {sorted(COMPRESSORS)}")
        if parts and plan.parts != {n: p.plan for n, p in parts.items()}:
            raise ValueError(f"the plan's parts {plan.parts} are not the parts given ({sorted(parts)})")
        plan = json.loads(json.dumps(plan.to_attrs()))  # the JSON form, as it would read back
        try:
            group = zarr.open_group(_location(url), mode="r+", zarr_format=3)
            old = dict(group.attrs)
        except (OSError, KeyError, ValueError, zarr.errors.BaseZarrError):  # OSError: e.g. URL is a file
            group, old = None, {}
        if group is not None and old.get("created"):
            if any(old.get(k) != v for k, v in plan.items()):
                raise UserError(f"{url} already holds a cache made with other settings; "
                                "delete it or choose another --out")
            return cls(url, group, rows_per_chunk * chunks_per_shard)
        if not create:
            raise RuntimeError(f"{url}: store not created by rank 0")
        if (group is not None and old.get("format") != FORMAT) or _foreign_folder(url, group):
            raise UserError(f"{url} exists and is not a feature cache; refusing to overwrite it")
        # the format goes in first: a store killed while being created is recognised and redone
        group = zarr.open_group(_location(url), mode="w", zarr_format=3, attributes={"format": FORMAT})
        writer = cls(url, group, rows_per_chunk * chunks_per_shard)
        for name, p in parts.items():
            writer._create_part(name, p, rows_per_chunk, compressor)
        group.attrs.update({**plan, "created": True})
        return writer

    def _create_part(self, name: str, p: PartInit, rows_per_chunk: int, compressor: str) -> None:
        g = self.group.create_group(name)
        n, k = p.n, p.k
        rpc = min(rows_per_chunk, n)
        rps = min(self.rows_per_shard, -(-n // rpc) * rpc)  # a small part: one shard of whole chunks
        n_shards = -(-n // rps)
        small = {"keys": (p.keys, str), "labels": (p.labels, np.int64), "dx": (p.views["dx"], np.int8),
                 "dy": (p.views["dy"], np.int8), "flip": (p.views["flip"], np.uint8),
                 "noise_seed": (p.noise_seed, np.int64)}
        for key, (value, dtype) in small.items():
            shape = (n, *np.shape(value)[1:])
            arr = g.create_array(key, shape=shape, dtype=dtype, chunks=(min(n, SMALL_CHUNK_ROWS), *shape[1:]),
                                 config={"write_empty_chunks": True})
            for a in range(0, n, SMALL_CHUNK_ROWS):  # chunk by chunk: a converted copy of one chunk at a time
                block = np.asarray(value[a:a + SMALL_CHUNK_ROWS])
                arr[a:a + len(block)] = block.astype(str) if key == "keys" else block.astype(dtype)
        for spec in p.targets:
            ts = spec.shape
            sg = self.group.create_group(set_path(name, spec))
            sg.create_array("features", shape=spec.array_shape(n, k), dtype=DTYPE, chunks=(rpc, k, *ts),
                            shards=(rps, k, *ts), compressors=COMPRESSORS[compressor](), fill_value=0,
                            config={"write_empty_chunks": True})
            for key in ("mean", "std"):
                sg.create_array(key, shape=ts, dtype="float32", chunks=ts, compressors=None,
                                config={"write_empty_chunks": True})
            sg.create_array("progress", shape=(n_shards, 32), dtype="uint8", chunks=(1, 32), compressors=None,
                            fill_value=0, config={"write_empty_chunks": True})
        if p.image_shape:
            shape = tuple(int(x) for x in p.image_shape)
            g.create_array(IMAGES, shape=(n, *shape), dtype="uint8", chunks=(rpc, *shape), shards=(rps, *shape),
                           compressors=IMAGE_CODEC(), fill_value=0, config={"write_empty_chunks": True})
            g.create_array("images_progress", shape=(n_shards, 32), dtype="uint8", chunks=(1, 32), compressors=None,
                           fill_value=0, config={"write_empty_chunks": True})
        layout = dataclasses.replace(p.record, n=n, k=k, rows_per_chunk=rpc, rows_per_shard=rps, n_shards=n_shards,
                                     compressor=compressor, images=bool(p.image_shape))
        g.attrs.update({**layout.to_attrs(), **layout.layout_attrs()})

    # -- shards -----------------------------------------------------------------------------------
    def n_shards(self, part: str) -> int:
        return int(self.group[part].attrs["n_shards"])

    def shard_rows(self, part: str, s: int) -> tuple[int, int]:
        rps = int(self.group[part].attrs["rows_per_shard"])
        return s * rps, min((s + 1) * rps, int(self.group[part].attrs["n"]))

    def sets(self, part: str) -> list[str]:
        """Names of the part's target sets (the groups under PART/targets)."""
        return sorted(self.group[part]["targets"].group_keys())

    def _arrays(self, part: str, name: str) -> tuple[zarr.Array, zarr.Array]:
        """(data, resume record) of a target set, or of the part's images (``IMAGES``)."""
        if name == IMAGES:
            return self.group[part][IMAGES], self.group[part]["images_progress"]
        g = self.group[set_path(part, name)]
        return g["features"], g["progress"]

    def _shard_sha(self, part: str, name: str, s: int) -> str:
        arr = self._arrays(part, name)[0]
        return _sha(_raw(arr.store, _data_keys(arr)[s]))

    def missing_shards(self, part: str, *, rehash: bool = True) -> dict[int, list[str]]:
        """Shard -> the target sets (and ``IMAGES``, where the part stores images) that lack it (not
        yet written, or whose file no longer matches its recorded checksum); shards every set holds
        are left out. ``rehash=False`` reads only the resume record (after extraction: finalize's
        manifest hashes every file anyway)."""
        todo: dict[int, list[str]] = {}
        names = self.sets(part) + ([IMAGES] if self.group[part].attrs.get(IMAGES) else [])
        for name in names:
            recorded = self._arrays(part, name)[1][...]
            for s in range(self.n_shards(part)):
                if not recorded[s].any() or (rehash and self._shard_sha(part, name, s) != bytes(recorded[s]).hex()):
                    todo.setdefault(s, []).append(name)
        return dict(sorted(todo.items()))

    def write_shard(self, part: str, s: int, blocks: dict[str, np.ndarray]) -> None:
        """Per target set (or ``IMAGES``): one assignment covering exactly zarr shard ``s``, then its
        checksum into that array's resume record."""
        a, b = self.shard_rows(part, s)
        for name, block in blocks.items():
            if block.shape[0] != b - a:
                raise ValueError(f"shard {s} of {part} needs {b - a} rows, got {block.shape[0]}")
            data, progress = self._arrays(part, name)
            # the old file goes first: a damaged one would be read back (zarr merges a partial shard
            # write into the existing file) and fail its checksum
            sync(data.store.delete(_data_keys(data)[s]))
            data[a:b] = block if name == IMAGES else block.astype(np.float16)
            progress[s] = np.frombuffer(bytes.fromhex(self._shard_sha(part, name, s)), dtype=np.uint8)

    # -- finalisation -----------------------------------------------------------------------------
    def finalize_part(self, part: str) -> None:
        """Per target set: per-element mean/std over all views of the part, from the stored float16 values."""
        for target in self.sets(part):
            g = self.group[set_path(part, target)]
            feats = g["features"]
            ts = feats.shape[2:]
            d = math.prod(ts)
            s1, s2, count = np.zeros(d), np.zeros(d), 0
            for s in range(self.n_shards(part)):
                a, b = self.shard_rows(part, s)
                x = feats[a:b].astype(np.float64).reshape(-1, d)
                s1 += x.sum(0)
                s2 += (x * x).sum(0)
                count += x.shape[0]
            mean = s1 / count
            std = np.sqrt(np.maximum(s2 / count - mean * mean, 0.0))
            g["mean"][...] = mean.astype(np.float32).reshape(ts)
            g["std"][...] = std.astype(np.float32).reshape(ts)

    def finalize(self, extra: dict) -> None:
        """The manifest of every file, the digest of the root attributes, then "complete", last."""
        store = self.group.store
        manifest = {k: _sha(_regular_file_raw(store, k)) for k in _list_keys(store) if k != ROOT_META}
        attrs = {**dict(self.group.attrs), **extra, "manifest": manifest}
        attrs["digest"] = attrs_digest(attrs)
        self.group.attrs.update(attrs)
        self.group.attrs.update({"complete": True})

    def read_identity(self, part: str, target: str, rows: np.ndarray | None = None) -> np.ndarray:
        """(N, size) float16 features of view 0 in one target set, flattened (for the probe): the
        identity where views are drawn identity-first or all, a uniformly drawn view otherwise.
        ``rows`` (sorted indices) reads only those rows' chunks, in that order."""
        a = self.group[set_path(part, target)]["features"]
        f = a[:, 0] if rows is None else a.oindex[np.asarray(rows, np.int64), 0]
        return f.reshape(len(f), -1)

"""Reading a finished store: ``open_cache`` -> ``FeatureCache`` -> ``CachePart`` (rows, views, noise
seeds, features and images by row), refusing stores that changed since they were verified."""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from pipeline.cache.contract import PATHS, CacheMeta, CachePlan, Fingerprint, PartRecord
from pipeline.cache.store.checks import _open_for_check, _part_problems
from pipeline.cache.store.layout import IMAGES, PARTS, _is_part, attrs_digest, resolve_path
from pipeline.cache.targets import TargetSpec, select
from pipeline.core.errors import UserError
from pipeline.core.views import ViewSpec, record_problem


class StoreChanged(UserError):
    """A file of a verified store is gone or no longer decodes (re-extracted, replaced, checked out)."""


def _read_rows(arr: zarr.Array, a: int, b: int, manifest: dict) -> np.ndarray:
    """Rows a..b of a row-sharded array, refusing what changed since the store was verified: zarr
    reads a shard file that is gone back as fill values (zero targets, black images) and fails in
    the codec on one whose bytes changed. One existence check per shard read."""
    rows_shard = (arr.shards or arr.chunks)[0]
    for s in range(a // rows_shard, max(a, b - 1) // rows_shard + 1):
        key = f"{arr.path}/{arr.metadata.encode_chunk_key((s,) + (0,) * (arr.ndim - 1))}"
        if key in manifest and not sync(arr.store.exists(key)):
            raise StoreChanged(f"{key}: gone since the cache was verified (re-extracted or replaced?)")
    try:
        return arr[a:b]
    except Exception as exc:  # a changed shard fails in the codec, whatever its type
        raise StoreChanged(f"{arr.path}: rows {a}-{b} no longer decode ({type(exc).__name__}): the cache "
                           "changed since it was verified") from None


class CachePart:
    """One part of a cache seen through one target set: metadata arrays in memory, features read
    on demand."""

    def __init__(self, group: zarr.Group, name: str, target: TargetSpec, record: PartRecord,
                 manifest: dict | None = None, view_spec: ViewSpec | None = None, resolve: Any = str) -> None:
        self.name, self._g, self.target, self.record = name, group, target, record
        self.view_spec = view_spec or ViewSpec()
        self._manifest = manifest or {}  # the verified files: one that disappears is refused when read
        self._set = group["targets"][target.name]
        self._features = self._set["features"]
        self.n, self.k = self._features.shape[:2]
        self.shape: tuple[int, ...] = target.shape  # of one target
        self.d = target.size
        self.rows_per_chunk = record.rows_per_chunk
        # the image split this part was made from, as a path to open ("" when not recorded)
        self.shards = resolve(record.shards) if record.shards else ""
        self.fingerprint: Fingerprint = record.fingerprint
        self.has_images = record.images  # the part stores its images (layout checked by FeatureCache.part)

    # the per-row arrays are read on first use: ``check_against`` first compares N with the image
    # shards' count, so a store that claims 10^9 rows is refused before they are loaded
    @functools.cached_property
    def keys(self) -> list[str]:
        return [str(k) for k in self._g["keys"][...]]

    @functools.cached_property
    def labels(self) -> np.ndarray:
        return self._g["labels"][...]

    @functools.cached_property
    def views(self) -> dict[str, np.ndarray]:
        """dx, dy, flip (N, K), checked against the cache's view spec (a resealed store with an
        offset outside [0, 2*pad] would train on crops that are not the views its targets belong to)."""
        views = {k: self._g[k][...] for k in ("dx", "dy", "flip")}
        problem = record_problem(views, self.view_spec)
        if problem:
            raise UserError(f"part {self.name!r}: view records: {problem}")
        return views

    @functools.cached_property
    def noise_seed(self) -> np.ndarray:
        return self._g["noise_seed"][...]

    @functools.cached_property
    def mean(self) -> np.ndarray:
        return self._set["mean"][...]

    @functools.cached_property
    def std(self) -> np.ndarray:
        return self._set["std"][...]

    @property
    def n_chunks(self) -> int:
        return -(-self.n // self.rows_per_chunk)

    def read_chunk(self, c: int) -> np.ndarray:
        """(rows_c, K, *shape) float16: one chunk, the streaming reader's unit of I/O."""
        a = c * self.rows_per_chunk
        return _read_rows(self._features, a, min(a + self.rows_per_chunk, self.n), self._manifest)

    @property
    def image_shape(self) -> tuple[int, ...]:
        """(H, W, C) of the stored images."""
        return tuple(self._g[IMAGES].shape[1:])

    def read_image_chunk(self, c: int) -> np.ndarray:
        """(rows_c, H, W, C) uint8: the images of chunk ``c`` (the same rows as ``read_chunk(c)``)."""
        a = c * self.rows_per_chunk
        return self.read_images(a, min(a + self.rows_per_chunk, self.n))

    def read_images(self, a: int, b: int) -> np.ndarray:
        """(b-a, H, W, C) uint8: the stored images of rows a..b (a part that stores them)."""
        if not self.has_images:
            raise UserError(f"part {self.name!r} stores no images (extracted with --no-images)")
        return _read_rows(self._g[IMAGES], a, b, self._manifest)

    def read_keys(self, a: int, b: int) -> list[str]:
        """The keys of rows a..b, without loading all N of them (a streaming reader's check)."""
        return [str(k) for k in self._g["keys"][a:b]]

    def read(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        """(B, *shape) float16: features[rows[i], views[i]] (one orthogonal read of the unique rows)."""
        rows, views = np.asarray(rows, np.int64), np.asarray(views, np.int64)
        if rows.shape != views.shape:
            raise ValueError("rows and views must have the same length")
        if len(rows) == 0:
            return np.zeros((0, *self.shape), np.float16)
        urows, inverse = np.unique(rows, return_inverse=True)
        block = self._features.oindex[(urows,) + (slice(None),) * (1 + len(self.shape))]
        return block[inverse, views]


class FeatureCache:
    """An opened, complete cache: ``meta`` is its validated root (``plan``: how it was made; digest,
    manifest, probe, diagnostics); ``attrs`` the raw root attribute dict it was read from."""

    def __init__(self, url: str, group: zarr.Group, meta: CacheMeta) -> None:
        self.url, self._g, self.meta = url, group, meta
        self.attrs: dict = dict(group.attrs)
        self.parts: list[str] = [p for p in PARTS if _is_part(group, p)]
        self._parts: dict[tuple[str, str], CachePart] = {}

    @property
    def plan(self) -> CachePlan:
        return self.meta.plan

    @property
    def digest(self) -> str:
        return self.meta.digest

    def resolve(self, recorded: str) -> str:
        """A path the store records, to open from here (relative to the store where it says so)."""
        return resolve_path(self.url, recorded, self.plan.paths == PATHS)

    @property
    def model_source(self) -> str:
        """The diffusion model the store was made with: a folder (resolved) or a hub id."""
        return self.resolve(self.plan.model.source)

    @property
    def targets(self) -> list[TargetSpec]:
        """Every target set the cache holds (t-major, in the order extraction was asked for)."""
        return list(self.plan.targets)

    @property
    def default_target(self) -> TargetSpec:
        return self.plan.default_target

    def target(self, t: int | None = None, layer: str | None = None) -> TargetSpec:
        """The set at (t, layer) (either left out: the default's); an absent one is refused with
        the list of those the cache holds."""
        return select(self.targets, self.default_target, t, layer)

    def part(self, name: str, target: TargetSpec | None = None) -> CachePart:
        """A part seen through one target set (default: the cache's default set)."""
        if name not in self.parts:
            raise UserError(f"{self.url}: no part {name!r} (has {', '.join(self.parts)})")
        target = target or self.default_target
        if target not in self.targets:
            raise UserError(f"{self.url}: no target set {target.name!r}")
        if (name, target.name) not in self._parts:
            problems = _part_problems(name, self._g[name], self.targets)
            if problems:
                raise UserError(f"{self.url}: {problems[0]}")
            try:
                record = PartRecord.from_attrs(dict(self._g[name].attrs), name)
            except UserError as exc:
                raise UserError(f"{self.url}: {exc}") from None
            self._parts[(name, target.name)] = CachePart(self._g[name], name, target, record, self.meta.manifest,
                                                         self.plan.view_spec, self.resolve)
        return self._parts[(name, target.name)]

    def check_against(self, part_name: str, shardset: Any, *, view_spec: dict | None = None,
                      image_size: int | None = None) -> None:
        """Refuse (UserError) a cache that does not belong to these images and this training setup."""
        part = self.part(part_name)
        where = f"{self.url} [{part_name}] vs {shardset.path}"
        self.check_fingerprint(part_name, shardset.fingerprint, shardset.path, view_spec=view_spec,
                               image_size=image_size)
        if list(shardset.keys[:part.n]) != part.keys:
            raise UserError(f"{where}: sample keys differ from the cache's keys")
        shape = tuple(shardset.images.shape[1:])
        if shape != part.fingerprint.image_shape:
            raise UserError(f"{where}: image shape {list(shape)} differs from the cache's {_listed(part.fingerprint.image_shape)}")

    def check_fingerprint(self, part_name: str, theirs: dict, path: str, *, view_spec: dict | None = None,
                          image_size: int | None = None) -> None:
        """What ``check_against`` checks without the images in memory: the part was built from the
        split whose fingerprint is ``theirs``, with this training setup (a streaming reader then
        checks the stored images against the split's per-shard records)."""
        part = self.part(part_name)
        fp = part.fingerprint
        where = f"{self.url} [{part_name}] vs {path}"
        if part.n > int(theirs.get("count", 0)):
            raise UserError(f"{where}: the cache has {part.n} rows, the image shards only {theirs.get('count')}")
        if not fp.matches(theirs):
            raise UserError(f"{where}: the cache was built from other data (fingerprint differs)")
        if list(theirs.get("image_shape", [])) != list(fp.image_shape or []):
            raise UserError(f"{where}: image shape {theirs.get('image_shape')} differs from the cache's "
                            f"{_listed(fp.image_shape)}")
        self.check_setup(view_spec=view_spec, image_size=image_size, where=where)

    def check_setup(self, *, view_spec: dict | None = None, image_size: int | None = None,
                    where: str | None = None) -> None:
        """The training setup a user asked for is the cache's: image size, normalisation, and each
        field of ``view_spec`` given (a field left out is the cache's, e.g. {"pad": 4})."""
        where = where or self.url
        if image_size is not None and int(image_size) != self.plan.image_size:
            raise UserError(f"{where}: image size {image_size} differs from the cache's {self.plan.image_size}")
        theirs = self.plan.view_spec.to_dict()
        if view_spec is not None and any(theirs.get(k) != v for k, v in dict(view_spec).items()):
            raise UserError(f"{where}: augmentation spec {view_spec} differs from the cache's {theirs}")


def open_cache(url: str) -> FeatureCache:
    """Open a complete cache for reading; refuses unfinished, foreign, old or re-labelled stores.

    The digest check is cheap (no data read): changed root attributes (t, layer, the model's
    weights hash, the manifest) are refused here; ``verify_cache`` checks every file against the
    manifest.
    """
    group, attrs, problem = _open_for_check(url)
    if problem:
        raise UserError(f"{url}: {problem}")
    if attrs.get("complete") is not True:
        raise UserError(f"{url}: incomplete cache (no \"complete\" marker); re-run extract to finish it")
    if attrs.get("digest") != attrs_digest(attrs):
        raise UserError(f"{url}: the root attributes were changed after extraction (digest mismatch); "
                        "refusing the cache")
    try:
        meta = CacheMeta.from_attrs(attrs)
    except UserError as exc:
        raise UserError(f"{url}: {exc}") from None
    return FeatureCache(str(url), group, meta)


def _listed(shape: tuple[int, ...] | None) -> list[int] | None:
    return None if shape is None else list(shape)

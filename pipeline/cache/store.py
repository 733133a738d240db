"""The feature cache: a sharded Zarr v3 group, the contract between stage one and stage two.

This is the only module that imports zarr. Layout::

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

import functools
import hashlib
import json
import math
import os
import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from pipeline.cache.targets import DTYPE, TargetSpec, select, targets_from_attrs
from pipeline.core.errors import UserError
from pipeline.core.storage import local_path
from pipeline.core.views import record_problem, spec_from_dict

FORMAT = "dra-feature-cache/3"  # 3: several (t, layer) target sets; 2: manifest + digest
OLD_FORMATS = {"dra-feature-cache/1": "its checksums cover feature chunks only, not the metadata",
               "dra-feature-cache/2": "it holds one target set in another layout"}
ROOT_META = "zarr.json"  # holds the manifest itself; covered by the digest instead
PATHS = "relative-to-store"  # root attribute ``paths``: recorded relative paths start at the store
PARTS = ("train", "synthetic", "test")
NORMALISATION = "x*2-1"  # images in [0, 1] are fed to the UNet as [-1, 1]
# Measured on float16 mid_block features of real Fashion-MNIST (6000 x 4 views x 64, default-size
# UNet, untrained weights): blosc-zstd+bitshuffle 1.19x (96 ms/3 MB write), blosc-lz4+bitshuffle
# 1.17x (38 ms), plain zstd 1.10x (38 ms), blosc-zstd+byte shuffle 1.12x. Half-precision
# activations are close to incompressible; bitshuffle is what helps. Writes run in a background
# thread, so the better ratio is free.
COMPRESSORS: dict[str, Any] = {
    "blosc-zstd": lambda: BloscCodec(cname="zstd", clevel=5, shuffle="bitshuffle", typesize=2),
    "blosc-lz4": lambda: BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle", typesize=2),
    "zstd": lambda: ZstdCodec(level=5),
}
SMALL_ARRAYS = ("keys", "labels", "dx", "dy", "flip", "noise_seed")
SMALL_CHUNK_ROWS = 65536  # rows per chunk of those: a reader of a few rows decodes one chunk, not all N
IMAGES = "images"  # the part's images, written and resumed like one more target set
# Measured on Fashion-MNIST uint8 images (4096 x 784 B): blosc-zstd level 3 without shuffle 1.79x
# (decodes ~600 MB/s on one contended EPYC core), blosc-lz4 1.48x, bitshuffle worse (1.2x).
IMAGE_CODEC = lambda: BloscCodec(cname="zstd", clevel=3, shuffle="noshuffle", typesize=1)  # noqa: E731
# what zarr raises on malformed metadata (a chunk of 0 rows divides by zero while it is read)
# AttributeError: a group where an array belongs (a hostile or damaged store)
MALFORMED = (KeyError, ValueError, TypeError, AttributeError, ArithmeticError, zarr.errors.BaseZarrError)


@dataclass
class PartInit:
    """Everything about a part that is known before any feature is computed."""

    keys: list[str]
    labels: np.ndarray
    views: dict[str, np.ndarray]  # dx, dy, flip (N, K)
    noise_seed: np.ndarray  # (N, K) int64
    targets: list[TargetSpec]  # the target sets every part holds
    attrs: dict = field(default_factory=dict)  # shards path, fingerprint, ...
    image_shape: tuple[int, ...] | None = None  # (H, W, C): the part stores its images too

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def k(self) -> int:
        return int(self.noise_seed.shape[1])


def _raw(store: Any, key: str) -> bytes | None:
    buf = sync(store.get(key, prototype=default_buffer_prototype()))
    return None if buf is None else buf.to_bytes()


def _sha(data: bytes | None) -> str:
    return "" if data is None else hashlib.sha256(data).hexdigest()


def _list_keys(store: Any) -> list[str]:
    """Every file the store holds (its own listing: the only names that are ever opened)."""
    async def collect() -> list[str]:
        return [k async for k in store.list()]

    return sorted(sync(collect()))


def _regular_file_raw(store: Any, key: str) -> bytes | None:
    """The file's bytes; a local entry that is not a regular file (symlink, device) raises UserError."""
    if isinstance(store, LocalStore):
        try:
            mode = os.lstat(Path(store.root) / key).st_mode
        except OSError:
            return None
        if not stat.S_ISREG(mode):
            raise UserError(f"{key}: not a regular file (a symlink or device); refused, not read")
    return _raw(store, key)


def attrs_digest(attrs: dict) -> str:
    """sha256 of the root attributes (manifest included), all but ``digest`` and ``complete``."""
    body = {k: v for k, v in attrs.items() if k not in ("digest", "complete")}
    return hashlib.sha256(json.dumps(body, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def _location(url: str) -> str:
    """file:// URLs become plain paths (zarr's LocalStore creates folders and writes atomically)."""
    local = local_path(url)
    return str(url) if local is None else local


def _foreign_folder(url: str, group: zarr.Group | None) -> bool:
    """A local path that exists, is not a zarr group and is not empty: never overwrite it."""
    path = Path(_location(url))
    if "://" in _location(url) or group is not None or not path.exists():
        return False
    return not path.is_dir() or any(path.iterdir())


def _open_group(url: str, mode: str) -> zarr.Group:
    try:
        # important: never consolidated metadata. zarr would take every array's metadata from the
        # root zarr.json (outside the manifest) instead of the array's own checksummed file
        return zarr.open_group(_location(url), mode=mode, zarr_format=3, use_consolidated=False)
    except ImportError as exc:
        raise UserError(f"{url}: the back-end for this URL is not installed ({exc})") from None
    except (FileNotFoundError, json.JSONDecodeError, *MALFORMED) as exc:
        raise UserError(f"{url}: not a readable feature cache ({type(exc).__name__}: {exc})") from None


def _split_url(url: str) -> tuple[str, str]:
    """(scheme, path after ``://``) of a URL; ("", absolute local path) of a local path or file:// URL."""
    local = local_path(url)
    if local is not None:
        return "", os.path.abspath(os.path.expanduser(local))
    scheme, rest = str(url).split("://", 1)
    return scheme, rest


def record_path(store: str, path: str) -> str:
    """How a store at ``store`` records ``path`` (an image split, the model folder): relative to the
    store, starting with ``./`` or ``../``, when both are local or on one URL scheme and bucket;
    otherwise absolute (a local path made absolute, or the URL as it is)."""
    (s_scheme, s_path), (p_scheme, p_path) = _split_url(store), _split_url(path)
    if s_scheme != p_scheme or (s_scheme and s_path.split("/", 1)[0] != p_path.split("/", 1)[0]):
        return p_path if not p_scheme else str(path)
    rel = (os.path.relpath if not s_scheme else posixpath.relpath)(p_path, s_path)
    return rel if rel.startswith("..") else f"./{rel}"


def resolve_path(store: str, recorded: str, relative: bool) -> str:
    """A path a store records, as a path or URL to open: ``./`` and ``../`` paths of a store that
    records paths relative to itself (``relative``) start at the store; anything else as recorded."""
    if not relative or not str(recorded).startswith(("./", "../")):
        return str(recorded)
    scheme, path = _split_url(store)
    if not scheme:
        local = str(local_path(store))  # as the user gave it: a relative store stays relative
        return os.path.normpath(os.path.join(local, recorded))
    return f"{scheme}://{posixpath.normpath(posixpath.join(path, recorded))}"


def _open_for_check(url: str) -> tuple[zarr.Group, dict, str | None]:
    """The group, its root attributes and the first problem of its format or root file (None when
    neither has one): what opening, verifying and re-checking a store all start with."""
    group = _open_group(str(url), "r")
    attrs = dict(group.attrs)
    return group, attrs, _format_problem(attrs) or _root_problem(group)


def _is_part(group: zarr.Group, name: str) -> bool:
    """A part group at the root, looked up by name: listing the root would also meet the bundled
    model's folder (``extract --bundle-model``), which zarr warns is not part of the hierarchy."""
    try:
        return isinstance(group[name], zarr.Group)
    except KeyError:
        return False


def set_path(part: str, target: TargetSpec | str) -> str:
    """The group of one target set of a part: ``PART/targets/t{t}-{layer}``."""
    return f"{part}/targets/{target if isinstance(target, str) else target.name}"


def _data_keys(arr: zarr.Array) -> list[str]:
    """Store keys of every chunk/shard file of an array, in grid order."""
    grid = [-(-s // c) for s, c in zip(arr.shape, arr.shards or arr.chunks)]
    keys = []
    for idx in np.ndindex(*grid):
        keys.append(f"{arr.path}/{arr.metadata.encode_chunk_key(idx)}")
    return keys


class CacheWriter:
    """Creates a store (or reopens one for resume), writes shards, finalises.

    ``plan`` is every root attribute known up front; a store on disk is resumed only if it
    records the same plan, so a re-run can never mix two configurations in one store.
    """

    def __init__(self, url: str, group: zarr.Group, rows_per_shard: int) -> None:
        self.url, self.group, self.rows_per_shard = url, group, rows_per_shard

    # -- creation / resume ----------------------------------------------------------------------
    @classmethod
    def open_or_create(cls, url: str, *, plan: dict, parts: dict[str, PartInit], rows_per_chunk: int,
                       chunks_per_shard: int, compressor: str, create: bool = True) -> CacheWriter:
        """Resume a store with the same plan, or create it (only where ``create``: rank 0)."""
        if compressor not in COMPRESSORS:
            raise UserError(f"unknown compressor {compressor!r}; choose one of {sorted(COMPRESSORS)}")
        plan = json.loads(json.dumps(plan))  # the JSON form, as it would read back
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
        small = {"keys": np.asarray(p.keys, dtype=str), "labels": np.asarray(p.labels, np.int64),
                 "dx": p.views["dx"].astype(np.int8), "dy": p.views["dy"].astype(np.int8),
                 "flip": p.views["flip"].astype(np.uint8), "noise_seed": p.noise_seed.astype(np.int64)}
        for key, value in small.items():
            arr = g.create_array(key, shape=value.shape, dtype=value.dtype if key != "keys" else str,
                                 chunks=(min(n, SMALL_CHUNK_ROWS), *value.shape[1:]), config={"write_empty_chunks": True})
            arr[...] = value
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
        g.attrs.update({**p.attrs, "n": n, "k": k, "rows_per_chunk": rpc, "rows_per_shard": rps,
                        "n_shards": n_shards, "compressor": compressor, IMAGES: bool(p.image_shape)})

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

    def read_identity(self, part: str, target: str) -> np.ndarray:
        """(N, size) float16 features of view 0 in one target set, flattened (for the probe)."""
        f = self.group[set_path(part, target)]["features"][:, 0]
        return f.reshape(len(f), -1)


# -- reading -------------------------------------------------------------------------------------
def _positive_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def _layout_problems(name: str, g: zarr.Group, specs: list[TargetSpec]) -> list[str]:
    """The part's attributes, its target sets and their chunking make sense (checked before
    anything is read by them)."""
    try:
        a = dict(g.attrs)
        ints = {k: a.get(k) for k in ("n", "k", "rows_per_chunk", "rows_per_shard", "n_shards")}
        if not all(map(_positive_int, ints.values())):
            return [f"{name}: malformed attributes {ints} (positive integers expected)"]
        held = sorted(g["targets"].group_keys()) if "targets" in g.group_keys() else []
        if held != sorted(s.name for s in specs):
            return [f"{name}: holds target sets {held}, the cache's specification lists "
                    f"{sorted(s.name for s in specs)}"]
        for spec in specs:
            f = g["targets"][spec.name]["features"]
            if tuple(f.shape) != spec.array_shape(ints["n"], ints["k"]) or min(f.chunks) < 1 \
                    or min(f.shards or f.chunks) < 1:
                return [f"{name}/targets/{spec.name}/features: shape {f.shape} or chunks {f.chunks} do not match "
                        f"N={ints['n']}, K={ints['k']}, target shape {list(spec.shape)}"]
            if (f.chunks[0], (f.shards or f.chunks)[0]) != (ints["rows_per_chunk"], ints["rows_per_shard"]):
                return [f"{name}: attributes say {ints['rows_per_chunk']}/{ints['rows_per_shard']} rows per "
                        f"chunk/shard, the features of {spec.name} {f.chunks[0]}/{(f.shards or f.chunks)[0]}"]
        if a.get(IMAGES) is not None and not isinstance(a.get(IMAGES), bool):
            return [f"{name}: malformed attribute images={str(a.get(IMAGES))[:40]!r} (true or false expected)"]
        if a.get(IMAGES):
            im, fp = g[IMAGES], a.get("fingerprint")
            want = [ints["n"], *(fp.get("image_shape", []) if isinstance(fp, dict) else [])]
            if list(im.shape) != want or len(want) != 4 or str(im.dtype) != "uint8" \
                    or tuple(im.chunks) != (ints["rows_per_chunk"], *im.shape[1:]) \
                    or tuple(im.shards or im.chunks) != (ints["rows_per_shard"], *im.shape[1:]):
                return [f"{name}/{IMAGES}: {im.dtype} shape {im.shape}, chunks {im.chunks}, shards {im.shards} do "
                        f"not match uint8 {want} in chunks/shards of {ints['rows_per_chunk']}/"
                        f"{ints['rows_per_shard']} rows"]
    except MALFORMED as exc:
        return [f"{name}: unreadable part ({type(exc).__name__}: {exc})"]
    return []


def _part_problems(name: str, g: zarr.Group, specs: list[TargetSpec]) -> list[str]:
    """Layout first (attributes, sets, chunking), then array shapes: what a part must pass before it is read."""
    return _layout_problems(name, g, specs) or _check_shapes(name, g, specs)


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

    def __init__(self, group: zarr.Group, name: str, target: TargetSpec, manifest: dict | None = None,
                 view_spec: dict | None = None, resolve: Any = str) -> None:
        self.name, self._g, self.target = name, group, target
        self.view_spec = spec_from_dict(view_spec)
        self._manifest = manifest or {}  # the verified files: one that disappears is refused when read
        self._set = group["targets"][target.name]
        self._features = self._set["features"]
        a = dict(group.attrs)
        self.attrs = a
        self.n, self.k = self._features.shape[:2]
        self.shape: tuple[int, ...] = target.shape  # of one target
        self.d = target.size
        self.rows_per_chunk = int(a["rows_per_chunk"])
        # the image split this part was made from, as a path to open ("" when not recorded)
        self.shards = resolve(a["shards"]) if isinstance(a.get("shards"), str) and a["shards"] else ""
        self.fingerprint = a.get("fingerprint", {})
        self.has_images = a.get(IMAGES) is True  # the part stores its images (layout checked by FeatureCache.part)

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
    """An opened, complete cache. ``attrs`` is the root attribute dict."""

    def __init__(self, url: str, group: zarr.Group) -> None:
        self.url, self._g = url, group
        self.attrs: dict = dict(group.attrs)
        self.parts: list[str] = [p for p in PARTS if _is_part(group, p)]
        self._parts: dict[tuple[str, str], CachePart] = {}

    def resolve(self, recorded: str) -> str:
        """A path the store records, to open from here (relative to the store where it says so)."""
        return resolve_path(self.url, recorded, self.attrs.get("paths") == PATHS)

    @property
    def model_source(self) -> str:
        """The diffusion model the store was made with: a folder (resolved) or a hub id."""
        model = self.attrs.get("model")
        source = model.get("source") if isinstance(model, dict) else None
        if not isinstance(source, str) or not source:
            raise UserError(f"{self.url}: records no diffusion model (model.source)")
        return self.resolve(source)

    @functools.cached_property
    def _targets(self) -> tuple[list[TargetSpec], TargetSpec]:
        return targets_from_attrs(self.attrs)

    @property
    def targets(self) -> list[TargetSpec]:
        """Every target set the cache holds (t-major, in the order extraction was asked for)."""
        return self._targets[0]

    @property
    def default_target(self) -> TargetSpec:
        return self._targets[1]

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
            manifest = self.attrs.get("manifest")
            self._parts[(name, target.name)] = CachePart(self._g[name], name, target,
                                                         manifest if isinstance(manifest, dict) else None,
                                                         self.attrs.get("view_spec"), self.resolve)
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
        shape = list(shardset.images.shape[1:])
        if shape != list(part.fingerprint.get("image_shape", [])):
            raise UserError(f"{where}: image shape {shape} differs from the cache's {part.fingerprint.get('image_shape')}")

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
        if fp.get("content_hash") != theirs.get("content_hash") or fp.get("count") != theirs.get("count") \
                or fp.get("shards_digest") != theirs.get("shards_digest"):
            raise UserError(f"{where}: the cache was built from other data (fingerprint differs)")
        if list(theirs.get("image_shape", [])) != list(fp.get("image_shape", [])):
            raise UserError(f"{where}: image shape {theirs.get('image_shape')} differs from the cache's "
                            f"{fp.get('image_shape')}")
        self.check_setup(view_spec=view_spec, image_size=image_size, where=where)

    def check_setup(self, *, view_spec: dict | None = None, image_size: int | None = None,
                    where: str | None = None) -> None:
        """The training setup a user asked for is the cache's: image size, normalisation, and each
        field of ``view_spec`` given (a field left out is the cache's, e.g. {"pad": 4})."""
        where = where or self.url
        if image_size is not None and int(image_size) != int(self.attrs["image_size"]):
            raise UserError(f"{where}: image size {image_size} differs from the cache's {self.attrs['image_size']}")
        if self.attrs.get("normalisation") != NORMALISATION:
            raise UserError(f"{self.url}: unknown normalisation {self.attrs.get('normalisation')!r}")
        theirs = dict(self.attrs["view_spec"])
        if view_spec is not None and any(theirs.get(k) != v for k, v in dict(view_spec).items()):
            raise UserError(f"{where}: augmentation spec {view_spec} differs from the cache's {theirs}")


ROOT_KEYS = {"zarr_format": 3, "node_type": "group"}  # and "attributes": all a root zarr.json may hold


def _root_problem(group: zarr.Group) -> str | None:
    """The root zarr.json holds the attributes (covered by the digest) and zarr's two fixed fields,
    nothing else: so the digest vouches for the whole file. A ``consolidated_metadata`` block (array
    metadata that zarr would read instead of each array's checksummed file) is refused."""
    try:
        meta = json.loads(_raw(group.store, ROOT_META) or b"null")
    except (ValueError, UnicodeDecodeError):
        return f"{ROOT_META}: not JSON"
    if not isinstance(meta, dict):
        return f"{ROOT_META}: not a JSON object"
    extra = sorted(set(meta) - set(ROOT_KEYS) - {"attributes"})
    if extra:
        return (f"{ROOT_META} holds {', '.join(map(repr, extra))}, which extraction never writes and the digest "
                "does not cover (array metadata is read only from each array's own checksummed file)")
    if any(meta.get(k) != v for k, v in ROOT_KEYS.items()):
        return f"{ROOT_META}: not a zarr v3 group"
    return None


def check_digest_value(digest: str) -> str:
    """A digest given by a user: 64 lowercase hex digits, never empty (an empty value is not "no digest")."""
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UserError(f"--digest {digest!r}: expected the 64 hex digits `cache info` prints (sha256)")
    return digest


def _format_problem(attrs: dict) -> str | None:
    fmt = attrs.get("format")
    if fmt in OLD_FORMATS:
        return (f"format {fmt} is no longer read ({OLD_FORMATS[fmt]}): rebuild the cache with "
                "`python -m pipeline extract` (same flags, another --out)")
    if fmt != FORMAT:
        return f"not a feature cache of format {FORMAT} (format: {fmt!r})"
    return None


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
        spec_from_dict(attrs.get("view_spec"))
    except UserError as exc:
        raise UserError(f"{url}: {exc}") from None
    return FeatureCache(str(url), group)


# -- verify and info -----------------------------------------------------------------------------
def _check_shapes(name: str, g: zarr.Group, specs: list[TargetSpec]) -> list[str]:
    """Shapes of the per-row arrays and of every set's statistics and resume record (the layout,
    N and K, already checked)."""
    problems = []
    try:
        a = g.attrs
        n, k, n_shards = a["n"], a["k"], a["n_shards"]
        want = {"keys": (n,), "labels": (n,), "dx": (n, k), "dy": (n, k), "flip": (n, k), "noise_seed": (n, k)}
        if a.get(IMAGES):
            want["images_progress"] = (n_shards, 32)
        arrays = {key: g for key in want}
        for spec in specs:
            sg = g["targets"][spec.name]
            for key, shape in (("mean", spec.shape), ("std", spec.shape), ("progress", (n_shards, 32))):
                want[f"targets/{spec.name}/{key}"], arrays[f"targets/{spec.name}/{key}"] = shape, sg
        for key, shape in want.items():
            holder, leaf = arrays[key], key.rsplit("/", 1)[-1]
            if leaf not in holder.array_keys():
                problems.append(f"{name}/{key}: missing array")
            elif tuple(holder[leaf].shape) != shape:
                problems.append(f"{name}/{key}: shape {tuple(holder[leaf].shape)}, expected {shape}")
    except MALFORMED as exc:
        problems.append(f"{name}: unreadable part ({type(exc).__name__}: {exc})")
    return problems


def _scan_finite(g: zarr.Group) -> list[str]:
    """Non-finite values in the features and mean/std of one target set (group ``g``).

    Read one chunk at a time: a whole shard decoded at once costs several times its raw size in
    peak memory (zarr's decode threads), and this scan runs in every training process.
    """
    problems, unreadable = [], set()
    feats = g["features"]
    rows_shard, rows_chunk = (feats.shards or feats.chunks)[0], feats.chunks[0]
    keys = _data_keys(feats)
    for a in range(0, feats.shape[0], rows_chunk):
        s = a // rows_shard
        if s in unreadable:
            continue
        try:
            x = feats[a:a + rows_chunk]
        except Exception as exc:  # a corrupted shard fails in the codec, whatever its type
            problems.append(f"{keys[s]}: unreadable ({type(exc).__name__}: {exc})")
            unreadable.add(s)
            continue
        bad = ~np.isfinite(x)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])[:5] + a
            problems.append(f"{keys[s]}: {int(bad.sum())} NaN/Inf values (rows {', '.join(map(str, rows))}...)")
    for key in ("mean", "std"):
        try:
            if not np.isfinite(g[key][...]).all():
                problems.append(f"{g.path}/{key}: NaN/Inf values")
        except Exception as exc:
            problems.append(f"{g.path}/{key}: unreadable ({type(exc).__name__})")
    return problems


def _grid_problems(g: zarr.Group, manifest: dict) -> list[str]:
    """Arrays whose shape needs more (or fewer) shard files than the manifest lists: extraction
    writes every shard (empty chunks too), so a store claiming 10^9 rows is caught here, from
    metadata alone, before any row is read or allocated."""
    problems = []
    try:
        for _, arr in g.members(max_depth=None):
            if not isinstance(arr, zarr.Array):
                continue
            grid = math.prod(-(-s // c) for s, c in zip(arr.shape, arr.shards or arr.chunks))
            held = sum(1 for k in manifest if k.startswith(f"{arr.path}/c/"))
            if grid != held:
                problems.append(f"{arr.path}: shape {tuple(arr.shape)} needs {grid} shard file(s), the store "
                                f"holds {held}")
    except MALFORMED as exc:
        problems.append(f"{g.path}: unreadable part ({type(exc).__name__}: {exc})")
    return problems


def _in_scope(key: str, parts: tuple[str, ...] | None) -> bool:
    return parts is None or "/" not in key or key.split("/", 1)[0] in parts


def _check_manifest(group: zarr.Group, attrs: dict, parts: tuple[str, ...] | None,
                    digest: str | None) -> list[str]:
    """Every listed file in the manifest with its checksum, every entry present, the digest right."""
    manifest = attrs.get("manifest")
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        return ["no manifest of the store's files (a cache must list every file's sha256)"]
    problems = []
    if attrs.get("digest") != attrs_digest(attrs):
        problems.append("root attributes changed after extraction (digest mismatch)")
    if digest is not None and attrs.get("digest") != digest:
        problems.append(f"digest {attrs.get('digest')} is not the expected {digest}")
    listed = [k for k in _list_keys(group.store) if k != ROOT_META]
    for key in listed:
        if not _in_scope(key, parts):
            continue
        if key not in manifest:
            problems.append(f"{key}: file not in the manifest (added or renamed after extraction)")
            continue
        try:
            got = _sha(_regular_file_raw(group.store, key))
        except UserError as exc:
            problems.append(str(exc))
            continue
        if got != manifest[key]:
            problems.append(f"{key}: checksum mismatch (corrupted, truncated or edited)")
    present = set(listed)
    problems += [f"{key}: missing file" for key in manifest if key not in present and _in_scope(key, parts)]
    return problems


def verify_cache(url: str, *, parts: tuple[str, ...] | None = None, digest: str | None = None) -> list[str]:
    """Every problem of a store, one line each: completeness, manifest and digest, shapes, NaN/Inf.

    ``parts`` limits the file, shape and NaN checks to those parts and the top-level metadata
    (``train`` checks only what it will read); None checks the whole store. ``digest``, when
    given, must be the store's (a digest obtained through a trusted channel).
    """
    if digest is not None:
        check_digest_value(digest)
    try:
        group, attrs, problem = _open_for_check(url)
    except UserError as exc:
        return [str(exc)]
    if problem:
        return [problem]
    problems = []
    if attrs.get("complete") is not True:
        problems.append("incomplete: no \"complete\" marker (extract did not finish)")
    else:
        problems += _check_manifest(group, attrs, parts, digest)
    if problems:  # shapes and values only of files the manifest vouches for
        return problems
    try:
        specs, _ = targets_from_attrs(attrs)
    except UserError as exc:
        return [str(exc)]
    try:
        view_spec = spec_from_dict(attrs.get("view_spec"))
    except UserError as exc:
        return [str(exc)]
    for name in [p for p in PARTS if _is_part(group, p) and (parts is None or p in parts)]:
        shape_problems = _grid_problems(group[name], attrs["manifest"]) or _part_problems(name, group[name], specs)
        if not shape_problems:
            views = {k: group[name][k][...] for k in ("dx", "dy", "flip")}
            shape_problems = [f"{name}: view records: {p}" for p in [record_problem(views, view_spec)] if p]
        problems += shape_problems or [p for spec in specs
                                       for p in _scan_finite(group[set_path(name, spec)])]
    if not any(_is_part(group, p) for p in PARTS):
        problems.append("no parts (train, synthetic, test) in the store")
    return problems


def recheck_cache(url: str, *, parts: tuple[str, ...], digest: str) -> list[str]:
    """A store verified earlier, checked again (a streaming run, at every checkpoint): the same
    digest, and every file of ``parts`` present and with its manifest checksum. No decoding."""
    try:
        group, attrs, problem = _open_for_check(url)
    except UserError as exc:
        return [str(exc)]
    if problem:
        return [problem]
    return _check_manifest(group, attrs, parts, digest)


def _size(store: Any, key: str) -> int:
    try:
        return int(sync(store.getsize(key)))
    except FileNotFoundError:
        return 0


def probe_table(probe: dict) -> list[str]:
    """The linear-probe accuracies of a store's target sets as t x layer rows (a text table)."""
    sets = probe.get("sets") if isinstance(probe, dict) else None
    if not isinstance(sets, list) or not sets:
        return []
    try:
        ts = list(dict.fromkeys(int(r["t"]) for r in sets))
        layers = list(dict.fromkeys(str(r["layer"]) for r in sets))
        acc = {(int(r["t"]), str(r["layer"])): r.get("probe_accuracy") for r in sets}
    except (KeyError, TypeError, ValueError):
        return ["  (malformed probe record)"]
    width = max(12, *(len(name) + 2 for name in layers))
    lines = ["  t \\ layer " + "".join(f"{name:>{width}}" for name in layers)]
    for t in ts:
        cells = (acc.get((t, name)) for name in layers)
        lines.append(f"  {t:<10d}" + "".join(f"{c:>{width}.4f}" if isinstance(c, (int, float)) else f"{'-':>{width}}"
                                             for c in cells))
    return lines


def cache_info(url: str) -> str:
    """A readable summary of a store (complete or not)."""
    group = _open_group(str(url), "r")
    a = dict(group.attrs)
    model = a.get("model", {})
    try:
        specs, default = targets_from_attrs(a)
        sets = ", ".join(f"{s.name} {'x'.join(map(str, s.shape))}" for s in specs) + f" (default {default.name})"
    except UserError as exc:
        specs, sets = [], str(exc)
    lines = [f"store:      {url}",
             f"complete:   {a.get('complete', False)}",
             f"digest:     {a.get('digest', '-')} (sha256 of the attributes and the manifest of every file)",
             f"model:      {model.get('source')} (weights sha256 {str(model.get('weights_sha256'))[:16]}...)"
             + (" (paths relative to the store)" if a.get("paths") == PATHS else ""),
             f"extraction: timesteps={a.get('timesteps')} layers={a.get('layers')} pooling={a.get('pooling')} "
             f"draws={a.get('draws')} condition={a.get('condition')} noise={a.get('noise')} seed={a.get('seed')}",
             f"targets:    {sets}",
             f"images:     {a.get('image_size')} px, {a.get('in_channels')} channel(s), "
             f"normalisation {a.get('normalisation')}, views {a.get('view_spec')}"]
    if "probe" in a:
        lines.append("probe:      linear-probe accuracy on the identity view (train rows fit -> held-out train rows), per target set")
        lines += probe_table(a["probe"])
    total = 0
    for name in [p for p in PARTS if _is_part(group, p)]:
        try:
            g = group[name]
            other = sum(_size(group.store, k) for arr in (g[x] for x in SMALL_ARRAYS if x in g.array_keys())
                        for k in _data_keys(arr))
        except MALFORMED as exc:
            lines.append(f"part {name:9s} unreadable ({type(exc).__name__}: {exc})")
            continue
        total += other
        lines.append(f"part {name:9s} N={g.attrs.get('n')} K={g.attrs.get('k')} "
                     f"compressor={g.attrs.get('compressor')}; per-row arrays {other / 2**20:.2f} MiB")
        if g.attrs.get(IMAGES) is True and IMAGES in g.array_keys():
            im = g[IMAGES]
            disk = sum(_size(group.store, k) for k in _data_keys(im))
            total += disk
            lines.append(f"  {IMAGES:24s} {'x'.join(map(str, im.shape[1:]))} uint8 (streamed with the targets): "
                         f"{disk / 2**20:.2f} MiB on disk, ratio {int(np.prod(im.shape)) / max(disk, 1):.2f}x")
        for spec in specs:
            if set_path(name, spec) not in group:
                lines.append(f"  {spec.name}: missing")
                continue
            try:
                sg = group[set_path(name, spec)]
                f = sg["features"]
                disk = sum(_size(group.store, k) for k in _data_keys(f))
                raw = int(np.prod(f.shape)) * f.dtype.itemsize
                n, k = f.shape[:2]
                done = int((sg["progress"][...].any(axis=1)).sum()) if "progress" in sg.array_keys() else 0
            except MALFORMED as exc:
                lines.append(f"  {spec.name}: unreadable ({type(exc).__name__}: {exc})")
                continue
            total += disk
            lines.append(f"  {spec.name:24s} D={'x'.join(map(str, f.shape[2:]))} {f.dtype} chunks={f.chunks} "
                         f"shards={f.shards} ({done}/{g.attrs.get('n_shards')} written): {disk / 2**20:.2f} MiB "
                         f"on disk, ratio {raw / max(disk, 1):.2f}x, {disk / max(n * k, 1):.1f} B/view")
    lines.append(f"total:      {total / 2**20:.2f} MiB of data files")
    return "\n".join(lines)

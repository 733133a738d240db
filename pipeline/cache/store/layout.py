"""Where things are in a store: format constants (the attributes' types: pipeline/cache/contract.py), codecs, parts and target-set paths, recorded paths
relative to the store, and the raw reads every other module uses (zarr internals stay here)."""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
import stat
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import zarr
from zarr.codecs import BloscCodec, ZstdCodec
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import LocalStore

from pipeline.cache.contract import PartPlan, PartRecord
from pipeline.cache.targets import TargetSpec
from pipeline.core.errors import UserError
from pipeline.core.storage import local_path

FORMAT = "dra-feature-cache/3"  # 3: several (t, layer) target sets; 2: manifest + digest
OLD_FORMATS = {"dra-feature-cache/1": "its checksums cover feature chunks only, not the metadata",
               "dra-feature-cache/2": "it holds one target set in another layout"}
ROOT_META = "zarr.json"  # holds the manifest itself; covered by the digest instead
PARTS = ("train", "synthetic", "test")
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

    keys: Sequence[str] | np.ndarray  # a list, or an array of str or (ASCII) bytes
    labels: np.ndarray
    views: dict[str, np.ndarray]  # dx, dy, flip (N, K)
    noise_seed: np.ndarray  # (N, K) int64
    targets: list[TargetSpec]  # the target sets every part holds
    record: PartRecord  # the image split it was made from (path, fingerprint) and how its views were drawn
    image_shape: tuple[int, ...] | None = None  # (H, W, C): the part stores its images too

    @property
    def n(self) -> int:
        return len(self.keys)

    @property
    def k(self) -> int:
        return int(self.noise_seed.shape[1])

    @property
    def plan(self) -> PartPlan:
        """The root's record of the part: its size and the data it is computed from (a resume on
        other images is refused)."""
        return PartPlan(self.n, self.k, self.record.fingerprint.content_hash)


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


def open_group(url: str, mode: str) -> zarr.Group:
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

"""Webdataset tar shards of (key, image, label): writing, reading, keys and fingerprints.

Layout of one split folder (a local path or any fsspec URL: ``memory://``, ``file://``, ``s3://``)::

    SPLIT/shard-000000.tar ...   members KEY.png (lossless image) and KEY.cls (label as text)
    SPLIT/fingerprint.json       written last: count, image shape, classes, content hash, shards

A local split is written into a temporary sibling folder and renamed into place once its
fingerprint is written, so a folder with that name is either complete or absent. Object stores
have no atomic rename: there the folder is cleared first and the fingerprint is written last, so a
split without one is incomplete. Readers refuse a split without a fingerprint and check each
shard's sha256 against it. Shards are read and written through fsspec; webdataset parses and
writes the tar members.

Shards can be written one at a time (``write_shard``, by any process that owns them) and the
fingerprint afterwards (``finish_split``), which is how ``generate`` runs under several processes.
Folder staging and fsspec I/O live in ``pipeline.core.storage``.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.core.errors import UserError
from pipeline.core.members import ENCODINGS, check_image, decode_npy, plain_tar_samples
from pipeline.core.storage import basename, commit, join, read_bytes, start, write_bytes

FINGERPRINT = "fingerprint.json"
SHARD_NAME = re.compile(r"shard-\d{6,}\.tar")
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # no dots (webdataset's extension separator), no slashes


def shard_name(s: int) -> str:
    return f"shard-{s:06d}.tar"


def check_key(key: str) -> str:
    """Refuse keys that could escape a folder or confuse webdataset."""
    if not KEY_RE.fullmatch(key):  # fullmatch: "$" alone would admit a trailing newline
        raise UserError(f"invalid sample key {key!r}: keys are 1-128 characters of [A-Za-z0-9_-]")
    return key


def make_keys(prefix: str, split: str, n: int, start: int = 0) -> list[str]:
    """Stable keys: ``{prefix}-{split}-{index:07d}``; the index is the position in the source."""
    return [check_key(f"{prefix}-{split}-{i:07d}") for i in range(start, start + n)]


class ContentHash:
    """``content_hash`` built as the data comes: keys first (given in chunks), then the pixels block
    by block in row order, then the labels. The bytes hashed are exactly ``content_hash``'s, so a
    split written block by block has the hash it would have had written whole."""

    def __init__(self, key_chunks: Iterable[list[str]]) -> None:
        self._h = hashlib.sha256(b"[")  # json.dumps(list(keys)), written piece by piece
        first = True
        for chunk in key_chunks:
            if chunk:
                self._h.update(((", " if not first else "") + ", ".join(map(json.dumps, chunk))).encode())
                first = False
        self._h.update(b"]")

    def update(self, images: np.ndarray) -> None:
        self._h.update(np.ascontiguousarray(images).tobytes())

    def finish(self, labels: np.ndarray) -> str:
        self._h.update(np.asarray(labels, dtype=np.int64).tobytes())
        return self._h.hexdigest()


def content_hash(keys: list[str], images: np.ndarray | Iterable[np.ndarray], labels: np.ndarray) -> str:
    """sha256 over keys, raw pixels and labels in order: equal data gives an equal hash.

    ``images`` may be one array or consecutive blocks of it (e.g. shard by shard): the bytes hashed,
    and so the hash, are the same, whatever the sharding.
    """
    h = ContentHash([list(keys)])
    for block in [images] if isinstance(images, np.ndarray) else images:
        h.update(block)
    return h.finish(labels)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_shard(folder: str | Path, s: int, keys: list[str], images: np.ndarray, labels: np.ndarray,
                bar: tqdm | None = None, encoding: str = "png") -> dict:
    """Shard ``s`` of a split as one tar file; returns its record (name, count, sha256). Each image
    is a member KEY.png (lossless PNG) or KEY.npy (the raw uint8 array); readers take either."""
    encode = ENCODINGS[encoding]
    buf = io.BytesIO()
    # PNG shards keep their historical bytes (a float mtime: a pax header before every member); npy
    # shards take an int mtime, which needs none (2 KiB less per sample)
    with wds.TarWriter(buf, mtime=0.0 if encoding == "png" else 0) as sink:
        for key, image, label in zip(keys, images, labels, strict=True):
            sink.write({"__key__": check_key(key), encoding: encode(image), "cls": str(int(label)).encode()})
            if bar is not None:
                bar.update(1)
    data = buf.getvalue()  # after the writer closed: the tar end-of-archive blocks are in
    write_bytes(join(folder, shard_name(s)), data)
    return {"name": shard_name(s), "count": len(keys), "sha256": hashlib.sha256(data).hexdigest(),
            "content": content_hash(keys, images, labels)}


def shards_digest(shards: list[dict]) -> str:
    """sha256 over the shard records (name, count, file and content hashes), in order.

    A reader of a prefix checks each shard it reads against its record and the records against
    this digest, which the cache also records: so a cache is joined to exactly the data it was
    built from even when only part of a split is read (the whole-split ``content_hash`` needs
    every shard).
    """
    rows = [[r.get("name"), r.get("count"), r.get("sha256"), r.get("content")] for r in shards]
    return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


def finish_split(stage: str, fingerprint: dict) -> dict:
    """Write the fingerprint, last: from now on the split in ``stage`` reads as complete."""
    write_bytes(join(stage, FINGERPRINT), json.dumps(fingerprint, indent=2).encode())
    return fingerprint


def make_fingerprint(keys: list[str] | int, image_shape: list[int], classes: list[str], shards: list[dict],
                     content: str, *, source: str = "", extra: dict | None = None) -> dict:
    """The split's fingerprint; ``keys``: the keys, or their count."""
    count = keys if isinstance(keys, int) else len(keys)
    if sum(r["count"] for r in shards) != count:
        raise ValueError("shard records do not add up to the keys")
    return {"count": count, "image_shape": list(image_shape), "classes": list(classes),
            "num_classes": len(classes), "content_hash": content, "source": source, "shards": shards,
            "shards_digest": shards_digest(shards), **(extra or {})}


def write_split(out_dir: str | Path, split: Split, keys: list[str], *, shard_size: int = 10_000,
                source: str = "", extra: dict | None = None, progress: bool = True, encoding: str = "png") -> dict:
    """Write one split as tar shards plus fingerprint, atomically. Returns the fingerprint."""
    if shard_size <= 0:
        raise UserError(f"shard size must be positive, got {shard_size}")
    if len(keys) != len(split.labels) or len(set(keys)) != len(keys):
        raise UserError("keys must be unique and one per sample")
    for k in keys:
        check_key(k)
    staging = start(out_dir, signature=(FINGERPRINT,))
    n = len(keys)
    name = basename(out_dir)
    with tqdm(total=n, desc=f"write {name}", unit="img", mininterval=2, disable=not progress) as bar:
        shards = [write_shard(staging, s, keys[a:a + shard_size], split.images[a:a + shard_size],
                              split.labels[a:a + shard_size], bar, encoding)
                  for s, a in enumerate(range(0, n, shard_size))]
    fp = make_fingerprint(keys, list(split.images.shape[1:]), list(split.classes), shards,
                          content_hash(keys, split.images, split.labels), source=source, extra=extra)
    finish_split(staging, fp)
    commit(staging, out_dir, signature=(FINGERPRINT,))
    return fp


def read_fingerprint(split_dir: str | Path) -> dict:
    url = join(split_dir, FINGERPRINT)
    data = read_bytes(url)
    if data is None:
        raise UserError(f"{split_dir}: not a complete shard set (no {FINGERPRINT}); run `prepare` again")
    try:
        fp = json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{url}: malformed fingerprint ({exc})") from None
    problem = _fingerprint_problem(fp)
    if problem:
        raise UserError(f"{url}: malformed fingerprint ({problem})")
    return fp


def _is_int(v: object, low: int = 0) -> bool:
    return type(v) is int and v >= low


def _fingerprint_problem(fp: object) -> str | None:
    """What makes a foreign fingerprint unusable (the fields every reader relies on), or None."""
    if not isinstance(fp, dict):
        return f"a JSON object is expected, got {type(fp).__name__}"
    if not _is_int(fp.get("count")):
        return f"count {fp.get('count')!r} is not an integer >= 0"
    shape = fp.get("image_shape")
    if not (isinstance(shape, list) and len(shape) == 3 and all(_is_int(v, 1) for v in shape)):
        return f"image_shape {shape!r} is not [H, W, C] of positive integers"
    classes = fp.get("classes")
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return "classes must be a non-empty list of names"
    shards = fp.get("shards")
    if not isinstance(shards, list) or not all(
            isinstance(r, dict) and isinstance(r.get("name"), str) and _is_int(r.get("count"))
            and isinstance(r.get("sha256"), str) for r in shards):
        return "shards must be a list of {name, count, sha256} records"
    return None


def split_exists(split_dir: str | Path) -> bool:
    """True when the folder holds a complete split (a fingerprint)."""
    return read_bytes(join(split_dir, FINGERPRINT)) is not None


@dataclass
class ShardSet:
    """A split loaded in memory, with the fingerprint it was checked against."""

    keys: list[str]
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    fingerprint: dict
    path: str

    def index_of(self) -> dict[str, int]:
        return {k: i for i, k in enumerate(self.keys)}


def _decode(sample: dict, path: str) -> tuple[str, np.ndarray, int]:
    key = check_key(sample["__key__"])
    try:
        if "npy" in sample and "png" not in sample:
            image = decode_npy(sample["npy"], f"{path}: sample {key}")
        else:
            with Image.open(io.BytesIO(sample["png"])) as im:
                check_image(im, f"{path}: sample {key}")
                image = np.asarray(im)
        label = int(sample["cls"])
    except (KeyError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UserError(f"{path}: corrupted sample {key} ({exc})") from None
    return key, image if image.ndim == 3 else image[..., None], label


def _shard_samples(split_dir: str | Path, shard: dict, verify: bool) -> tuple[str, list[dict]]:
    """(url, the shard's samples undecoded) of one listed shard, its file checked against its record."""
    if not isinstance(shard.get("name"), str) or not SHARD_NAME.fullmatch(shard["name"]):
        raise UserError(f"{split_dir}: fingerprint names a shard {str(shard.get('name'))[:80]!r}, not "
                        "shard-NNNNNN.tar (a name must not lead outside the split folder)")
    url = join(split_dir, shard["name"])
    data = read_bytes(url)
    if data is None:
        raise UserError(f"{split_dir}: missing shard {shard['name']}")
    if verify and hashlib.sha256(data).hexdigest() != shard["sha256"]:
        raise UserError(f"{url}: checksum mismatch (corrupted or truncated shard)")
    try:
        samples = plain_tar_samples(data)
        if samples is None:
            members = wds.tariterators.tar_file_expander([{"url": url, "stream": io.BytesIO(data)}])
            samples = list(wds.tariterators.group_by_keys(members))
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise UserError(f"{split_dir}: unreadable shard ({exc})") from None
    if len(samples) != shard["count"]:
        raise UserError(f"{url}: holds {len(samples)} samples, its fingerprint says {shard['count']}")
    return url, samples


def _label(sample: dict, path: str) -> tuple[str, int]:
    key = check_key(sample["__key__"])
    try:
        return key, int(sample["cls"])
    except (KeyError, ValueError) as exc:
        raise UserError(f"{path}: corrupted sample {key} ({exc})") from None


def iter_shards(split_dir: str | Path, shards: list[dict], *, verify: bool = True
                ) -> Iterator[tuple[list[str], np.ndarray, np.ndarray]]:
    """(keys, uint8 images (n,H,W,C), labels) of each listed shard in order, each checked against its record."""
    for shard in shards:
        url, samples = _shard_samples(split_dir, shard, verify)
        keys, images, labels = [], [], []
        for sample in samples:
            k, im, lab = _decode(sample, str(split_dir))
            keys.append(k), images.append(im), labels.append(lab)
        if len({im.shape for im in images}) > 1:
            raise UserError(f"{url}: images of different sizes {sorted({im.shape for im in images})[:3]}")
        block = np.stack(images) if images else np.zeros((0, 1, 1, 1), np.uint8)
        label_arr = np.asarray(labels, np.int64)
        if verify and "content" in shard and images and content_hash(keys, block, label_arr) != shard["content"]:
            raise UserError(f"{url}: keys, pixels or labels differ from the shard's record in the fingerprint")
        yield keys, block, label_arr


def _prefix_shards(split_dir: str | Path, fp: dict, limit: int, verify: bool) -> tuple[int, list[dict]]:
    """(rows wanted, the shards that hold them) of a split's first ``limit`` rows (all with 0)."""
    if verify and "shards_digest" in fp and fp["shards_digest"] != shards_digest(fp.get("shards", [])):
        raise UserError(f"{split_dir}: the shard records differ from the fingerprint's shards_digest")
    want = fp["count"] if limit <= 0 else min(limit, fp["count"])
    needed, have = [], 0
    for shard in fp["shards"]:
        if have >= want:
            break
        needed.append(shard)
        have += shard["count"]
    if have < want or not needed:
        raise UserError(f"{split_dir}: read {have} samples, fingerprint says {want}")
    return want, needed


def _check_keys_labels(split_dir: str | Path, fp: dict, keys: np.ndarray | list[str], labels: np.ndarray) -> None:
    """Unique keys (a join by key would silently take one of them) and labels within the classes."""
    if len(np.unique(np.asarray(keys))) != len(keys):
        seen: set = set()
        repeated = next(k for k in keys if k in seen or seen.add(k))
        repeated = repeated.decode() if isinstance(repeated, bytes) else repeated
        raise UserError(f"{split_dir}: sample key {repeated!r} occurs more than once; keys must be unique")
    num_classes = int(fp.get("num_classes") or len(fp.get("classes", [])) or 0)
    if len(labels) and (labels.min() < 0 or (num_classes and labels.max() >= num_classes)):
        raise UserError(f"{split_dir}: labels outside [0, {num_classes}) (min {labels.min()}, "
                        f"max {labels.max()})")


def read_split(split_dir: str | Path, *, verify: bool = True, limit: int = 0,
               progress: bool = False) -> ShardSet:
    """Load a whole split (checked against its fingerprint) into memory.

    ``limit`` keeps the first N samples (their order is the shard order, which the keys record).
    Every process reads what it asks for; stages split the work themselves, by sample or shard.
    """
    fp = read_fingerprint(split_dir)
    want, needed = _prefix_shards(split_dir, fp, limit, verify)
    keys, blocks, labels = [], [], []
    name = basename(split_dir)
    with tqdm(total=want, desc=f"read {name}", unit="img", mininterval=2, disable=not progress) as bar:
        for k, im, lab in iter_shards(split_dir, needed, verify=verify):
            keys += k
            blocks.append(im)
            labels.append(lab)
            bar.update(len(k))
    if any(list(b.shape[1:]) != list(fp["image_shape"]) for b in blocks):
        raise UserError(f"{split_dir}: images of shape {[list(b.shape[1:]) for b in blocks][:3]}, its "
                        f"fingerprint says {fp['image_shape']}")
    images_arr = np.concatenate(blocks)[:want]
    labels_arr = np.concatenate(labels)[:want]
    keys = keys[:want]
    _check_keys_labels(split_dir, fp, keys, labels_arr)
    if want == fp["count"] and verify and content_hash(keys, images_arr, labels_arr) != fp["content_hash"]:
        raise UserError(f"{split_dir}: content hash differs from its fingerprint")
    return ShardSet(keys, images_arr, labels_arr, fp, str(split_dir))


@dataclass
class Split:
    images: np.ndarray  # uint8 (N, H, W, C)
    labels: np.ndarray  # int64 (N,)
    classes: list[str]

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.images.dtype != np.uint8:
            raise UserError(f"images must be uint8 (N,H,W,C), got {self.images.dtype} {self.images.shape}")
        if len(self.images) != len(self.labels):
            raise UserError(f"{len(self.images)} images but {len(self.labels)} labels")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= len(self.classes)):
            raise UserError(f"labels outside 0..{len(self.classes) - 1}")



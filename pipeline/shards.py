"""Webdataset tar shards of (key, image, label): writing, reading, keys and fingerprints.

Layout of one split folder::

    SPLIT/shard-000000.tar ...   members KEY.png (lossless image) and KEY.cls (label as text)
    SPLIT/fingerprint.json       written last: count, image shape, classes, content hash, shards

A split is written into a temporary sibling folder and renamed into place once its fingerprint
is written, so a folder with that name is either complete or absent. Readers refuse a folder
without a fingerprint and check each shard's sha256 against it.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import webdataset as wds
from PIL import Image
from tqdm import tqdm

from pipeline.errors import UserError
from pipeline.sources import Split, encode_png

FINGERPRINT = "fingerprint.json"
KEY_RE = re.compile(r"^[A-Za-z0-9_-]{1,128}$")  # no dots (webdataset's extension separator), no slashes


def check_key(key: str) -> str:
    """Refuse keys that could escape a folder or confuse webdataset."""
    if not KEY_RE.fullmatch(key):  # fullmatch: "$" alone would admit a trailing newline
        raise UserError(f"invalid sample key {key!r}: keys are 1-128 characters of [A-Za-z0-9_-]")
    return key


def make_keys(prefix: str, split: str, n: int, start: int = 0) -> list[str]:
    """Stable keys: ``{prefix}-{split}-{index:07d}``; the index is the position in the source."""
    return [check_key(f"{prefix}-{split}-{i:07d}") for i in range(start, start + n)]


def content_hash(keys: list[str], images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 over keys, raw pixels and labels in order: equal data gives an equal hash."""
    h = hashlib.sha256()
    h.update(json.dumps(list(keys)).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    h.update(np.asarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def write_split(out_dir: str | Path, split: Split, keys: list[str], *, shard_size: int = 10_000,
                source: str = "", extra: dict | None = None, progress: bool = True) -> dict:
    """Write one split as tar shards plus fingerprint, atomically. Returns the fingerprint."""
    out_dir = Path(out_dir)
    if shard_size <= 0:
        raise UserError(f"shard size must be positive, got {shard_size}")
    if len(keys) != len(split.labels) or len(set(keys)) != len(keys):
        raise UserError("keys must be unique and one per sample")
    for k in keys:
        check_key(k)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = []
    n = len(keys)
    bar = tqdm(total=n, desc=f"write {out_dir.name}", unit="img", disable=not progress)
    for s, start in enumerate(range(0, n, shard_size)):
        name = f"shard-{s:06d}.tar"
        with open(tmp / name, "wb") as fh, wds.TarWriter(fh, mtime=0.0) as sink:
            for i in range(start, min(n, start + shard_size)):
                sink.write({"__key__": keys[i], "png": encode_png(split.images[i]),
                            "cls": str(int(split.labels[i])).encode()})
                bar.update(1)
        shards.append({"name": name, "count": min(n, start + shard_size) - start,
                       "sha256": file_sha256(tmp / name)})
    bar.close()
    fp = {"count": n, "image_shape": list(split.images.shape[1:]), "classes": list(split.classes),
          "num_classes": len(split.classes), "content_hash": content_hash(keys, split.images, split.labels),
          "source": source, "shards": shards, **(extra or {})}
    (tmp / FINGERPRINT).write_text(json.dumps(fp, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    return fp


def read_fingerprint(split_dir: str | Path) -> dict:
    path = Path(split_dir) / FINGERPRINT
    if not path.is_file():
        raise UserError(f"{split_dir}: not a complete shard set (no {FINGERPRINT}); run `prepare` again")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: malformed fingerprint ({exc})") from None


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
        image = np.asarray(Image.open(io.BytesIO(sample["png"])))
        label = int(sample["cls"])
    except (KeyError, OSError, ValueError) as exc:
        raise UserError(f"{path}: corrupted sample {key} ({exc})") from None
    return key, image if image.ndim == 3 else image[..., None], label


def read_split(split_dir: str | Path, *, verify: bool = True, limit: int = 0,
               progress: bool = False) -> ShardSet:
    """Load a whole split (checked against its fingerprint) into memory.

    ``limit`` keeps the first N samples (their order is the shard order, which the keys record).
    """
    split_dir = Path(split_dir)
    fp = read_fingerprint(split_dir)
    want = fp["count"] if limit <= 0 else min(limit, fp["count"])
    urls, have = [], 0
    for shard in fp["shards"]:
        if have >= want:
            break
        path = split_dir / shard["name"]
        if not path.is_file():
            raise UserError(f"{split_dir}: missing shard {shard['name']}")
        if verify and file_sha256(path) != shard["sha256"]:
            raise UserError(f"{path}: checksum mismatch (corrupted or truncated shard)")
        urls.append(str(path))
        have += shard["count"]
    keys, images, labels = [], [], []
    try:
        # every process reads the whole split (stages split the work themselves, by sample or shard)
        ds = wds.WebDataset(urls, shardshuffle=False, empty_check=False, nodesplitter=lambda src: src)
        for sample in tqdm(ds, total=want, desc=f"read {split_dir.name}", disable=not progress):
            k, im, lab = _decode(sample, str(split_dir))
            keys.append(k), images.append(im), labels.append(lab)
            if len(keys) >= want:
                break
    except (tarfile.TarError, OSError, ValueError) as exc:
        raise UserError(f"{split_dir}: unreadable shard ({exc})") from None
    if len(keys) != want:
        raise UserError(f"{split_dir}: read {len(keys)} samples, fingerprint says {want}")
    images_arr = np.stack(images)
    labels_arr = np.asarray(labels, dtype=np.int64)
    if want == fp["count"] and verify and content_hash(keys, images_arr, labels_arr) != fp["content_hash"]:
        raise UserError(f"{split_dir}: content hash differs from its fingerprint")
    return ShardSet(keys, images_arr, labels_arr, fp, str(split_dir))

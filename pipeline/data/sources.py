"""Readers of raw datasets: IDX (Fashion-MNIST), CIFAR-10/100 pickles, image folders, npz.

Every reader returns ``{split: Split}`` with images as uint8 (N, H, W, C) and int64 labels.
Readers check what they read (magic numbers, sizes, counts) and raise ``UserError`` with one line.
Important: CIFAR's python batches are pickles; they are read with an unpickler that only admits
the numpy array reconstruction globals, so a crafted batch cannot run code.
"""

from __future__ import annotations

import gzip
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.core.members import check_image
from pipeline.core.shards import Split
from pipeline.data.config import CIFAR10_CLASSES, MAX_SOURCE_BYTES, SourceFormat
from pipeline.data.npz import NpzRows, _npz_member, _read_npz_source

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp"}
FASHION_MNIST_HINT = ("install Debian's dataset-fashion-mnist (files in /usr/share/datasets/"
                      "fashion-mnist) or download the IDX files from github.com/zalandoresearch/fashion-mnist")


def detect_format(root: Path) -> SourceFormat:
    if root.is_file() and root.suffix == ".npz":
        return SourceFormat.npz
    if not root.exists():
        raise UserError(f"dataset not found: {root} ({FASHION_MNIST_HINT})")
    if not root.is_dir():
        raise UserError(f"{root}: a dataset folder (or an .npz file) is expected, not this file")
    names = {p.name for p in root.iterdir()}
    if any(n.startswith(("train-images-idx3", "t10k-images-idx3")) for n in names):
        return SourceFormat.idx
    if "data_batch_1" in names:
        return SourceFormat.cifar10
    if {"train", "test", "meta"} <= names and (root / "meta").is_file():
        return SourceFormat.cifar100
    if any(n.endswith(".npz") for n in names):
        return SourceFormat.npz
    if any(p.is_dir() for p in root.iterdir()):
        return SourceFormat.folder
    raise UserError(f"cannot tell the dataset format of {root}: pass --format")


def read_source(root: str | Path, fmt: SourceFormat = SourceFormat.auto, *, limit: int = 0) -> dict[str, Split]:
    """Read a raw dataset into ``{split: Split}``; ``limit`` > 0 keeps the first N samples of each
    split (IDX and npz files are then read only that far: a compressed file is never inflated whole)."""
    root = Path(root)
    fmt = detect_format(root) if fmt == SourceFormat.auto else SourceFormat(fmt)
    if not root.exists():
        raise UserError(f"dataset not found: {root}")
    if fmt in (SourceFormat.idx, SourceFormat.npz):  # streamed: read only as far as `limit`
        return _STREAMED[fmt](root, limit)
    splits = _READERS[fmt](root)
    if limit:
        splits = {k: Split(v.images[:limit], v.labels[:limit], v.classes) for k, v in splits.items()}
    return splits


def is_streamed(root: str | Path, fmt: SourceFormat = SourceFormat.auto) -> bool:
    """Whether ``read_source`` reads this source only as far as ``limit`` (IDX, npz)."""
    fmt = detect_format(Path(root)) if fmt == SourceFormat.auto else SourceFormat(fmt)
    return fmt in _STREAMED


def read_labels(root: str | Path, fmt: SourceFormat = SourceFormat.auto) -> dict[str, np.ndarray]:
    """Every label of each split of a streamed source (IDX, npz), without its images: what
    ``prepare`` judges the row order by when ``--limit`` reads only a prefix of the images."""
    root = Path(root)
    fmt = detect_format(root) if fmt == SourceFormat.auto else SourceFormat(fmt)
    if fmt == SourceFormat.idx:
        return {split: read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), 2049).astype(np.int64)
                for split, prefix in (("train", "train"), ("test", "t10k"))}
    if fmt != SourceFormat.npz:
        raise ValueError(f"read_labels reads streamed formats only, not {fmt.value}")
    files = [root] if root.is_file() else sorted(root.glob("*.npz"))
    parts = []
    for f in files:
        try:
            with zipfile.ZipFile(f) as zf:
                parts.append(np.asarray(_npz_member(zf, "label", f, 0)).reshape(-1).astype(np.int64))
        except (OSError, ValueError, EOFError, KeyError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
            raise UserError(f"cannot read the labels of {f}: {exc}") from None
    return {"train": np.concatenate(parts) if parts else np.zeros(0, np.int64)}


# --- IDX -------------------------------------------------------------------------------------
def read_idx(path: Path, expected_magic: int, limit: int = 0) -> np.ndarray:
    """Parse one IDX file (big-endian header: magic, dims; then uint8 data), gzip or not.

    Streamed: the header is read first, then exactly the bytes it announces (or, with ``limit``,
    those of the first ``limit`` items) plus one to detect padding, so a small compressed file
    that inflates to gigabytes is never read whole.
    """
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        with (gzip.open(path, "rb") if gz else open(path, "rb")) as fh:
            head = fh.read(4)
            if len(head) < 4:
                raise UserError(f"{path}: truncated IDX header")
            magic = struct.unpack(">i", head)[0]
            if magic != expected_magic:
                raise UserError(f"{path}: IDX magic number {magic}, expected {expected_magic}")
            ndim = magic & 0xFF
            dim_bytes = fh.read(4 * ndim)
            if len(dim_bytes) < 4 * ndim:
                raise UserError(f"{path}: truncated IDX header")
            dims = list(struct.unpack(f">{ndim}i", dim_bytes))
            if min(dims) < 0 or int(np.prod(dims, dtype=np.float64)) > MAX_SOURCE_BYTES:
                raise UserError(f"{path}: IDX header announces {dims} items, more than {MAX_SOURCE_BYTES} bytes")
            size = int(np.prod(dims))
            if limit and limit < dims[0]:
                dims[0], whole = limit, False
            else:
                whole = True
            want = int(np.prod(dims))
            data = fh.read(want + 1 if whole else want)
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    if len(data) < want or (whole and len(data) > want):
        raise UserError(f"{path}: truncated or padded IDX file (header says {size} data bytes)")
    return np.frombuffer(data, dtype=np.uint8).reshape(dims)


def _find(root: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (root / name).exists():
            return root / name
    raise UserError(f"missing {stem}[.gz] in {root} ({FASHION_MNIST_HINT})")


def _read_idx_dir(root: Path, limit: int = 0) -> dict[str, Split]:
    out = {}
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images = read_idx(_find(root, f"{prefix}-images-idx3-ubyte"), 2051, limit)
        labels = read_idx(_find(root, f"{prefix}-labels-idx1-ubyte"), 2049, limit)
        if len(images) != len(labels):
            raise UserError(f"{root}: {prefix} has {len(images)} images but {len(labels)} labels")
        out[split] = Split(images[..., None].copy(), labels.astype(np.int64), FASHION_MNIST_CLASSES)
    return out


# --- CIFAR pickles ---------------------------------------------------------------------------
class _NumpyOnlyUnpickler(pickle.Unpickler):
    ALLOWED = {("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
               ("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode")}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")
        return super().find_class(module, name)


def load_cifar_pickle(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"missing CIFAR file {path} (the 'python version' archive from "
                        "www.cs.toronto.edu/~kriz/cifar.html, extracted)")
    try:
        with path.open("rb") as fh:
            obj = _NumpyOnlyUnpickler(fh, encoding="bytes").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as exc:
        raise UserError(f"{path}: not a CIFAR python batch ({exc})") from None
    if not isinstance(obj, dict):
        raise UserError(f"{path}: not a CIFAR python batch")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}


def _cifar_split(batches: list[dict], label_key: str, classes: list[str], path: Path) -> Split:
    try:
        data = np.concatenate([np.asarray(b["data"], dtype=np.uint8) for b in batches])
        labels = np.concatenate([np.asarray(b[label_key]) for b in batches])
    except KeyError as exc:
        raise UserError(f"{path}: CIFAR batch lacks {exc}") from None
    except (ValueError, TypeError) as exc:  # ragged or non-numeric data
        raise UserError(f"{path}: CIFAR batch arrays are malformed ({exc})") from None
    if labels.dtype.kind not in "iu" or labels.ndim != 1:  # strings, floats, objects: never cast
        raise UserError(f"{path}: CIFAR '{label_key}' must be integers, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if data.ndim != 2 or data.shape[1] != 3072:
        raise UserError(f"{path}: CIFAR data must be (N, 3072), got {data.shape}")
    return Split(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1).copy(), labels, classes)


def _names(meta: dict, key: str) -> list[str]:
    return [n.decode() if isinstance(n, bytes) else str(n) for n in meta.get(key, [])]


def _read_cifar10(root: Path) -> dict[str, Split]:
    meta_path = root / "batches.meta"
    classes = _names(load_cifar_pickle(meta_path), "label_names") if meta_path.exists() else CIFAR10_CLASSES
    train = [load_cifar_pickle(root / f"data_batch_{i}") for i in range(1, 6)]
    test = [load_cifar_pickle(root / "test_batch")]
    return {"train": _cifar_split(train, "labels", classes, root),
            "test": _cifar_split(test, "labels", classes, root)}


def _read_cifar100(root: Path) -> dict[str, Split]:
    classes = _names(load_cifar_pickle(root / "meta"), "fine_label_names")
    if len(classes) != 100:
        raise UserError(f"{root / 'meta'}: expected 100 fine_label_names, got {len(classes)}")
    return {s: _cifar_split([load_cifar_pickle(root / s)], "fine_labels", classes, root)
            for s in ("train", "test")}


# --- image folders ---------------------------------------------------------------------------
def _read_folder_split(root: Path, classes: list[str] | None = None) -> Split:
    classes = classes or sorted(p.name for p in root.iterdir() if p.is_dir())
    images, labels = [], []
    for label, name in enumerate(classes):
        folder = root / name
        files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        for path in files:
            try:
                with Image.open(path) as im:
                    check_image(im, path)
                    arr = np.asarray(im.convert("L" if im.mode in ("L", "1") else "RGB"))
            except (OSError, Image.DecompressionBombError) as exc:
                raise UserError(f"cannot decode image {path}: {exc}") from None
            images.append(arr[..., None] if arr.ndim == 2 else arr)
            labels.append(label)
    if not images:
        raise UserError(f"no images under {root} (expected {root}/CLASS/IMAGE.png)")
    shapes = {im.shape for im in images}
    if len(shapes) != 1:
        raise UserError(f"{root}: images of different shapes {sorted(shapes)[:3]}; resize them first")
    return Split(np.stack(images), np.asarray(labels, dtype=np.int64), classes)


def _read_folder(root: Path) -> dict[str, Split]:
    subdirs = {p.name for p in root.iterdir() if p.is_dir()}
    if {"train", "test"} <= subdirs:
        train = _read_folder_split(root / "train")
        return {"train": train, "test": _read_folder_split(root / "test", train.classes)}
    return {"train": _read_folder_split(root)}


class ArrayRows:
    """A split read into memory (IDX, CIFAR, folders: sets that fit), behind ``NpzRows``' interface.
    ``all_labels``: every label of the split where ``labels`` is a prefix of them."""

    def __init__(self, split: Split, all_labels: np.ndarray | None = None) -> None:
        self.split, self.n, self.labels, self.classes = split, len(split.labels), split.labels, split.classes
        self.all_labels = split.labels if all_labels is None else all_labels
        self.image_shape = tuple(split.images.shape[1:])

    def read(self, rows: np.ndarray) -> np.ndarray:
        return self.split.images[np.asarray(rows, np.int64)]

    def close(self) -> None:
        pass


def open_rows(root: str | Path, fmt: SourceFormat = SourceFormat.auto, *, limit: int = 0,
              scratch: str | Path | None = None) -> dict[str, ArrayRows | NpzRows]:
    """``{split: rows}`` of a raw dataset for ``prepare``: an npz set is read block by block
    (``NpzRows``), any other format whole, IDX files only as far as ``limit`` (``all_labels`` still
    holds every label). ``limit`` 0: every row."""
    root = Path(root)
    fmt = detect_format(root) if fmt == SourceFormat.auto else SourceFormat(fmt)
    if fmt == SourceFormat.npz:
        if not root.exists():
            raise UserError(f"dataset not found: {root}")
        return {"train": NpzRows(root, limit=limit, scratch=scratch)}
    if limit and fmt == SourceFormat.idx:  # read only as far as the limit; the order is judged by every label
        return {name: ArrayRows(split, read_labels(root, fmt)[name])
                for name, split in read_source(root, fmt, limit=limit).items()}
    splits = read_source(root, fmt)
    return {name: ArrayRows(Split(s.images[:limit or None], s.labels[:limit or None], s.classes), s.labels)
            for name, s in splits.items()}


_READERS = {SourceFormat.idx: _read_idx_dir, SourceFormat.cifar10: _read_cifar10,
            SourceFormat.cifar100: _read_cifar100, SourceFormat.folder: _read_folder,
            SourceFormat.npz: _read_npz_source}
_STREAMED = {SourceFormat.idx: _read_idx_dir, SourceFormat.npz: _read_npz_source}

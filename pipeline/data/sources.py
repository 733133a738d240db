"""Readers of raw datasets: IDX (Fashion-MNIST), CIFAR-10/100 pickles, image folders, npz.

Every reader returns ``{split: Split}`` with images as uint8 (N, H, W, C) and int64 labels.
Readers check what they read (magic numbers, sizes, counts) and raise ``UserError`` with one line.
Important: CIFAR's python batches are pickles; they are read with an unpickler that only admits
the numpy array reconstruction globals, so a crafted batch cannot run code.
"""

from __future__ import annotations

import gzip
import os
import pickle
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.core.shards import Split, check_image
from pipeline.data.config import SourceFormat

FASHION_MNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
MAX_CLASSES = 100_000  # more class indices than any labelled set has (ImageNet-21k: 21,841)
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
MAX_SOURCE_BYTES = 8 * 2**30  # larger than any IDX dataset; a header claiming more is refused unread


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


# --- npz (generated sets) --------------------------------------------------------------------
def _npy_header(fh, path: Path, name: str) -> tuple[tuple[int, ...], bool, np.dtype]:
    """(shape, fortran_order, dtype) of one ``.npy`` stream, read from its header (and checked)."""
    version = np.lib.format.read_magic(fh)
    if version not in ((1, 0), (2, 0), (3, 0)):
        raise UserError(f"{path}: {name}: unsupported .npy format version {version}")
    read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) \
        else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(fh, max_header_size=10_000)
    if dtype.hasobject:
        raise UserError(f"{path}: {name}: object arrays are refused")
    if any(d < 0 for d in shape):
        raise UserError(f"{path}: {name}: negative dimension in shape {shape}")
    return tuple(shape), bool(fortran), dtype


def _npz_member(zf: zipfile.ZipFile, name: str, path: Path, limit: int) -> np.ndarray:
    """One ``.npy`` member of an npz, read into memory: its header is read first and checked (dtype,
    shape, at most MAX_SOURCE_BYTES), then only the bytes of the first ``limit`` rows (all with 0),
    so a small compressed file announcing or inflating to gigabytes is refused unread."""
    with zf.open(name + ".npy") as fh:
        shape, fortran, dtype = _npy_header(fh, path, name)
        total = int(np.prod(shape, dtype=np.float64)) * dtype.itemsize
        if total > MAX_SOURCE_BYTES:
            raise UserError(f"{path}: {name} announces shape {shape} of {dtype} ({total} bytes), "
                            f"more than {MAX_SOURCE_BYTES} bytes")
        rows = shape[0] if shape else 1
        keep = min(limit, rows) if limit and not fortran and shape else rows
        want = (total // rows if rows else 0) * keep
        data = fh.read(want + 1 if keep == rows else want)
        if len(data) < want or (keep == rows and len(data) > want):
            raise UserError(f"{path}: {name}: truncated or padded array (header says {total} bytes)")
    arr = np.frombuffer(data, dtype=dtype)
    if fortran and shape:
        return arr.reshape(shape[::-1]).transpose()[:limit or None]
    return arr.reshape((keep, *shape[1:]) if shape else ())


def _check_labels(labels: np.ndarray, path: Path) -> np.ndarray:
    if labels.dtype.kind not in "iu" or labels.ndim != 1:  # float labels would be truncated, str ones fail
        raise UserError(f"{path}: 'label' must be a 1-d integer array, got {labels.dtype} {labels.shape}")
    labels = labels.astype(np.int64)
    if len(labels) and (labels.min() < 0 or labels.max() >= MAX_CLASSES):
        raise UserError(f"{path}: labels must be class indices 0..{MAX_CLASSES - 1}, got {labels.min()}..{labels.max()}")
    return labels


def _check_image_shape(shape: tuple[int, ...], dtype: np.dtype, path: Path) -> None:
    if dtype != np.uint8 or len(shape) != 4 or min(shape[1:3], default=0) < 1 or shape[-1] not in (1, 3):
        raise UserError(f"{path}: 'image' must be uint8 (N,H,W,C) with H, W >= 1 and C 1 or 3, "
                        f"got {dtype} {shape}")


def _classes(labels: np.ndarray, channels: int) -> list[str]:
    n_classes = int(labels.max()) + 1 if len(labels) else 1
    return CIFAR10_CLASSES if n_classes <= 10 and channels == 3 else [str(i) for i in range(n_classes)]


def read_npz(path: Path, limit: int = 0) -> Split:
    """An npz of arrays ``image`` (N,H,W,C uint8) and ``label`` (N integers), read into memory;
    ``limit`` > 0 reads only the first N rows of each."""
    try:
        with zipfile.ZipFile(path) as zf:
            files = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
            if not {"image", "label"} <= files:
                raise UserError(f"{path}: npz needs arrays 'image' and 'label', has {sorted(files)}")
            images = _npz_member(zf, "image", path, limit)
            labels = _npz_member(zf, "label", path, limit)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
        raise UserError(f"cannot read {path}: {exc}") from None
    _check_image_shape(images.shape, images.dtype, path)
    labels = _check_labels(labels, path)  # Split checks the counts and the label range
    return Split(images, labels, _classes(labels, images.shape[-1]))


def npz_files(root: Path) -> list[Path]:
    files = [root] if root.is_file() else sorted(root.glob("*.npz"))
    if not files:
        raise UserError(f"no .npz files in {root}")
    return files


def _read_npz_source(root: Path, limit: int = 0) -> dict[str, Split]:
    files = npz_files(root)
    parts: list[Split] = []
    for f in files:
        left = limit - sum(len(p.labels) for p in parts) if limit else 0
        if limit and left <= 0:
            break
        parts.append(read_npz(f, left))
    shapes = {p.images.shape[1:] for p in parts}
    if len(shapes) > 1:
        raise UserError(f"{root}: the npz files hold images of different shapes "
                        f"({', '.join(str(tuple(s)) for s in sorted(shapes))}); one set has one shape")
    n_classes = max(len(p.classes) for p in parts)
    classes = next(p.classes for p in parts if len(p.classes) == n_classes)
    return {"train": Split(np.concatenate([p.images for p in parts]),
                           np.concatenate([p.labels for p in parts]), classes)}


@dataclass
class _Member:
    """Where one npz file's ``image`` rows are: the file, its row count, and, for a stored
    (uncompressed) member, the byte offset of row 0 in the file (random access by ``pread``)."""

    path: Path
    rows: int
    offset: int | None  # None: deflated (read as a stream)


class NpzRows:
    """The rows of one or more npz files (``image`` N,H,W,C uint8 and ``label``), in name order, read
    block by block: memory is bounded by the block asked for, never by the set.

    Opening reads every header and every label (8 bytes a row) and checks them: dtype, shape, one
    image shape for all files, label count and range, and that each member's size in the zip
    directory is exactly its header plus the rows it announces (a truncated or padded member is
    refused before any pixel is read). ``read(rows)`` returns the images of the given row indices:
    a stored member is read at the rows' offsets; a deflated one is inflated as a stream, so reads
    of increasing, contiguous rows (prepare's source order) cost one pass, and any other order
    (a shuffled order) first inflates it once into a temporary raw file in ``scratch``.
    """

    def __init__(self, root: str | Path, *, limit: int = 0, scratch: str | Path | None = None) -> None:
        root = Path(root)
        self.members: list[_Member] = []
        labels, shapes = [], set()
        for path in npz_files(root):  # every file's labels (prepare judges the order by all of them)
            try:
                with zipfile.ZipFile(path) as zf:
                    names = {n[:-4] for n in zf.namelist() if n.endswith(".npy")}
                    if not {"image", "label"} <= names:
                        raise UserError(f"{path}: npz needs arrays 'image' and 'label', has {sorted(names)}")
                    lab = _check_labels(np.asarray(_npz_member(zf, "label", path, 0)), path)
                    shape, member = self._image_member(zf, path)
            except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile) as exc:
                raise UserError(f"cannot read {path}: {exc}") from None
            if len(lab) != member.rows:
                raise UserError(f"{path}: {member.rows} images but {len(lab)} labels")
            shapes.add(shape)
            self.members.append(member)
            labels.append(lab)
        if len(shapes) > 1:
            raise UserError(f"{root}: the npz files hold images of different shapes "
                            f"({', '.join(str(s) for s in sorted(shapes))}); one set has one shape")
        self.all_labels = np.concatenate(labels)  # of every file, whatever the limit
        self.n = min(limit, len(self.all_labels)) if limit else len(self.all_labels)
        self.labels = self.all_labels[:self.n]
        self.image_shape = next(iter(shapes))
        self.classes = _classes(self.labels, self.image_shape[-1])
        self.row_bytes = int(np.prod(self.image_shape))
        self.starts = np.cumsum([0] + [m.rows for m in self.members])
        self.scratch = scratch
        self._stream: tuple[int, int, object, object] | None = None  # (member, next row, zip, handle)
        self._raw: dict[int, Path] = {}  # deflated member -> its inflated temporary file
        self._tmp: tempfile.TemporaryDirectory | None = None

    def _image_member(self, zf: zipfile.ZipFile, path: Path) -> tuple[tuple[int, ...], _Member]:
        info = zf.getinfo("image.npy")
        with zf.open(info) as fh:
            shape, fortran, dtype = _npy_header(fh, path, "image")
            header = fh.tell()  # bytes of the .npy header (the uncompressed position, deflated or not)
        _check_image_shape(shape, dtype, path)
        if fortran:
            raise UserError(f"{path}: 'image' is stored in Fortran order, which cannot be read row by row; "
                            "save it with np.ascontiguousarray")
        offset = None
        if info.compress_type == zipfile.ZIP_STORED:
            with open(path, "rb") as raw:  # the data of a stored member follows its local file header
                raw.seek(info.header_offset + 26)
                name_len, extra_len = struct.unpack("<HH", raw.read(4))
            offset = info.header_offset + 30 + name_len + extra_len + header
        announced = header + int(np.prod(shape, dtype=np.float64))
        if info.file_size != announced:
            raise UserError(f"{path}: image: truncated or padded array (the zip says {info.file_size} bytes, "
                            f"its header announces {announced})")
        return tuple(int(x) for x in shape[1:]), _Member(path, int(shape[0]), offset)

    def read(self, rows: np.ndarray) -> np.ndarray:
        """uint8 (len(rows), H, W, C): the images of these row indices, in their order."""
        rows = np.asarray(rows, np.int64)
        out = np.empty((len(rows), *self.image_shape), np.uint8)
        if not len(rows):
            return out
        if rows.min() < 0 or rows.max() >= self.n:
            raise IndexError(f"rows outside [0, {self.n})")
        contiguous = bool(np.all(np.diff(rows) == 1))
        which = np.searchsorted(self.starts, rows, side="right") - 1
        for m in np.unique(which):
            sel = np.flatnonzero(which == m)
            local = rows[sel] - self.starts[m]
            out[sel] = self._read_member(int(m), local, contiguous)
        return out

    def _read_member(self, m: int, local: np.ndarray, contiguous: bool) -> np.ndarray:
        member = self.members[m]
        if member.offset is not None or m in self._raw:
            path, base = (member.path, member.offset) if member.offset is not None else (self._raw[m], 0)
            return self._pread(path, base, local)
        if contiguous:
            return self._stream_rows(m, int(local[0]), len(local))
        self._inflate(m)
        return self._pread(self._raw[m], 0, local)

    def _pread(self, path: Path, base: int, local: np.ndarray) -> np.ndarray:
        out = np.empty((len(local), *self.image_shape), np.uint8)
        flat = out.reshape(len(local), -1)
        fd = os.open(path, os.O_RDONLY)
        try:
            order = np.argsort(local, kind="stable")  # ascending offsets: runs of rows are one read
            i = 0
            while i < len(order):
                j = i + 1
                while j < len(order) and local[order[j]] == local[order[j - 1]] + 1:
                    j += 1
                first, count = int(local[order[i]]), j - i
                data = os.pread(fd, count * self.row_bytes, base + first * self.row_bytes)
                if len(data) != count * self.row_bytes:
                    raise UserError(f"{path}: truncated (rows {first}..{first + count} are not all there)")
                flat[order[i:j]] = np.frombuffer(data, np.uint8).reshape(count, -1)
                i = j
        finally:
            os.close(fd)
        return out

    def _stream_rows(self, m: int, first: int, count: int) -> np.ndarray:
        """Rows [first, first + count) of a deflated member, from a stream kept open between calls
        (a read behind the stream's position starts it again)."""
        if self._stream is None or self._stream[0] != m or self._stream[1] > first:
            self.close_stream()
            zf = zipfile.ZipFile(self.members[m].path)
            fh = zf.open("image.npy")
            _npy_header(fh, self.members[m].path, "image")
            self._stream = (m, 0, zf, fh)
        _, pos, zf, fh = self._stream
        try:
            skip = (first - pos) * self.row_bytes
            while skip > 0:
                skip -= len(fh.read(min(skip, 1 << 24)) or b"") or skip
            want = count * self.row_bytes
            data = fh.read(want)
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(f"cannot read {self.members[m].path}: {exc}") from None
        if len(data) != want:
            raise UserError(f"{self.members[m].path}: image: truncated (rows {first}..{first + count} are not all there)")
        self._stream = (m, first + count, zf, fh)
        return np.frombuffer(data, np.uint8).reshape(count, *self.image_shape)

    def _inflate(self, m: int) -> None:
        """A deflated member, inflated once into a temporary raw file (random access for a shuffle)."""
        if self._tmp is None:
            self._tmp = tempfile.TemporaryDirectory(prefix=".npz-rows-", dir=self.scratch)
        path = Path(self._tmp.name, f"{m}.raw")
        member = self.members[m]
        try:
            with zipfile.ZipFile(member.path) as zf, zf.open("image.npy") as fh, open(path, "wb") as dst:
                _npy_header(fh, member.path, "image")
                left = member.rows * self.row_bytes
                while left > 0:
                    block = fh.read(min(left, 1 << 24))
                    if not block:
                        raise UserError(f"{member.path}: image: truncated")
                    dst.write(block)
                    left -= len(block)
        except (OSError, EOFError, zipfile.BadZipFile) as exc:
            raise UserError(f"cannot read {member.path}: {exc}") from None
        self._raw[m] = path

    def close_stream(self) -> None:
        if self._stream is not None:
            self._stream[3].close()
            self._stream[2].close()
            self._stream = None

    def close(self) -> None:
        self.close_stream()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None

    def __enter__(self) -> NpzRows:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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

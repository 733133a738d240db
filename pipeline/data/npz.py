"""npz sets (the format of generated image sets): arrays ``image`` (N,H,W,C uint8) and ``label``,
read whole (``read_npz``: sets that fit) or block by block (``NpzRows``: any size)."""

from __future__ import annotations

import os
import struct
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError
from pipeline.core.shards import Split
from pipeline.core.streamed import gather_rows
from pipeline.data.config import CIFAR10_CLASSES, MAX_CLASSES, MAX_SOURCE_BYTES


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
        contiguous = bool(np.all(np.diff(rows) == 1))
        return gather_rows(rows, self.n, self.starts, self.image_shape,
                           lambda m, local: self._read_member(m, local, contiguous))

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
            while skip > 0:  # read past the rows before ``first``; a short stream fails the read below
                block = fh.read(min(skip, 1 << 24))
                if not block:
                    break
                skip -= len(block)
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

"""prepare: every source format round-trips into shards; bad input is refused in one line."""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.core.shards import read_split
from pipeline.data.config import PrepareConfig, SourceFormat
from pipeline.data.sources import read_idx, read_source
from stages import prepare

ROOT = Path(__file__).resolve().parents[1]


def _idx_bytes(arr: np.ndarray, magic: int) -> bytes:
    return struct.pack(f">i{arr.ndim}i", magic, *arr.shape) + arr.astype(np.uint8).tobytes()


def _write_idx_dir(root: Path, n: int = 20, *, labels_n: int | None = None, gz: bool = True) -> None:
    rng = np.random.default_rng(0)
    root.mkdir(parents=True, exist_ok=True)
    for prefix in ("train", "t10k"):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = rng.integers(0, 10, labels_n or n, dtype=np.uint8)
        for stem, arr, magic in ((f"{prefix}-images-idx3-ubyte", images, 2051),
                                 (f"{prefix}-labels-idx1-ubyte", labels, 2049)):
            data = _idx_bytes(arr, magic)
            (root / (stem + ".gz" if gz else stem)).write_bytes(gzip.compress(data) if gz else data)


def test_real_fashion_mnist_labels_equal_idx(fmnist_shards, fmnist_dir):
    """The fixture's shards (first 512 real images) carry exactly the IDX labels and pixels."""
    shards = read_split(fmnist_shards / "train")
    images = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz", 2051)[:512]
    labels = read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz", 2049)[:512]
    assert shards.images.shape == (512, 28, 28, 1)
    np.testing.assert_array_equal(shards.labels, labels)
    np.testing.assert_array_equal(shards.images[..., 0], images)
    assert shards.keys[:2] == ["fmnist-train-0000000", "fmnist-train-0000001"]
    fp = shards.fingerprint
    assert fp["count"] == 512 and fp["image_shape"] == [28, 28, 1] and fp["num_classes"] == 10
    assert sum(s["count"] for s in fp["shards"]) == 512 and len(fp["shards"]) == 3


@pytest.mark.slow
def test_real_fashion_mnist_full_counts(tmp_path, fmnist_dir):
    out = prepare.run(PrepareConfig(source=str(fmnist_dir), out=str(tmp_path / "fm")))
    assert out["train"]["count"] == 60_000 and out["test"]["count"] == 10_000
    train = read_split(tmp_path / "fm" / "train")
    labels = read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz", 2049)
    np.testing.assert_array_equal(train.labels, labels)


def test_same_input_same_fingerprint(tmp_path):
    _write_idx_dir(tmp_path / "raw")
    a = prepare.run(PrepareConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "a")))
    b = prepare.run(PrepareConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "b")))
    assert a["train"]["content_hash"] == b["train"]["content_hash"]
    assert (tmp_path / "a/train/shard-000000.tar").read_bytes() == (tmp_path / "b/train/shard-000000.tar").read_bytes()


def _cifar_batch(n: int, label_key: str, n_classes: int, seed: int) -> dict:
    rng = np.random.default_rng(seed)
    return {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            label_key.encode(): [int(v) for v in rng.integers(0, n_classes, n)]}


def test_cifar10_round_trip(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = {f"data_batch_{i}": _cifar_batch(8, "labels", 10, i) for i in range(1, 6)}
    batches["test_batch"] = _cifar_batch(6, "labels", 10, 9)
    for name, batch in batches.items():
        (root / name).write_bytes(pickle.dumps(batch))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))
    prepare.run(PrepareConfig(source=str(root), out=str(tmp_path / "out")))
    train = read_split(tmp_path / "out" / "train")
    assert train.images.shape == (40, 32, 32, 3) and train.fingerprint["classes"][3] == "c3"
    first = batches["data_batch_1"][b"data"][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(train.images[0], first)
    np.testing.assert_array_equal(train.labels[:8], batches["data_batch_1"][b"labels"])
    assert read_split(tmp_path / "out" / "test").fingerprint["count"] == 6


def test_cifar100_round_trip(tmp_path):
    root = tmp_path / "cifar-100-python"
    root.mkdir()
    train, test = _cifar_batch(12, "fine_labels", 100, 1), _cifar_batch(5, "fine_labels", 100, 2)
    (root / "train").write_bytes(pickle.dumps(train))
    (root / "test").write_bytes(pickle.dumps(test))
    (root / "meta").write_bytes(pickle.dumps({b"fine_label_names": [f"f{i}".encode() for i in range(100)]}))
    prepare.run(PrepareConfig(source=str(root), out=str(tmp_path / "out")))
    got = read_split(tmp_path / "out" / "train")
    np.testing.assert_array_equal(got.labels, train[b"fine_labels"])
    assert got.fingerprint["num_classes"] == 100


def test_cifar_pickle_cannot_run_code(tmp_path):
    class Evil:
        def __reduce__(self):
            return (Path.touch, (tmp_path / "pwned",))

    root = tmp_path / "c"
    root.mkdir()
    (root / "data_batch_1").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UserError, match="refusing to load global"):
        read_source(root, SourceFormat.cifar10)
    assert not (tmp_path / "pwned").exists()


def test_npz_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 30)
    np.savez(tmp_path / "gen.npz", image=images, label=labels)
    prepare.run(PrepareConfig(source=str(tmp_path / "gen.npz"), out=str(tmp_path / "out"), shard_size=7))
    got = read_split(tmp_path / "out" / "train")
    np.testing.assert_array_equal(got.images, images)
    np.testing.assert_array_equal(got.labels, labels)
    assert len(got.fingerprint["shards"]) == 5


def test_image_folder_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    expect = {}
    for split in ("train", "test"):
        for cls in ("cat", "dog"):
            (tmp_path / "imgs" / split / cls).mkdir(parents=True)
            for i in range(3):
                arr = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
                Image.fromarray(arr).save(tmp_path / "imgs" / split / cls / f"{i}.png")
                expect[(split, cls, i)] = arr
    prepare.run(PrepareConfig(source=str(tmp_path / "imgs"), out=str(tmp_path / "out")))
    got = read_split(tmp_path / "out" / "train")
    assert got.fingerprint["classes"] == ["cat", "dog"]
    np.testing.assert_array_equal(got.labels, [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(got.images[4], expect[("train", "dog", 1)])


@pytest.mark.parametrize("corrupt, message", [
    ("magic", "magic number"),
    ("truncate", "truncated"),
    ("counts", "labels"),
    ("missing", "missing"),
])
def test_bad_idx_refused_without_output(tmp_path, corrupt, message):
    raw = tmp_path / "raw"
    _write_idx_dir(raw, labels_n=19 if corrupt == "counts" else None, gz=False)
    path = raw / "train-images-idx3-ubyte"
    if corrupt == "magic":
        path.write_bytes(struct.pack(">i", 2049) + path.read_bytes()[4:])
    elif corrupt == "truncate":
        path.write_bytes(path.read_bytes()[:-100])
    elif corrupt == "missing":
        path.unlink()
    proc = subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--source", str(raw),
                           "--out", str(tmp_path / "out")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0], proc.stderr
    assert not (tmp_path / "out" / "train" / "fingerprint.json").exists()


def test_truncated_tar_refused(tmp_path):
    _write_idx_dir(tmp_path / "raw")
    prepare.run(PrepareConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "out")))
    shard = tmp_path / "out" / "train" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:3000])
    with pytest.raises(UserError, match="checksum"):
        read_split(tmp_path / "out" / "train")
    with pytest.raises(UserError):
        read_split(tmp_path / "out" / "train", verify=False)


def test_incomplete_split_refused(tmp_path):
    _write_idx_dir(tmp_path / "raw")
    prepare.run(PrepareConfig(source=str(tmp_path / "raw"), out=str(tmp_path / "out")))
    (tmp_path / "out" / "train" / "fingerprint.json").unlink()
    with pytest.raises(UserError, match="not a complete shard set"):
        read_split(tmp_path / "out" / "train")


def test_cli_lists_stages():
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0 and "prepare" in proc.stdout and "not implemented" not in proc.stdout


def test_gzip_bomb_is_read_only_as_far_as_the_limit(tmp_path):
    """A small .gz whose header announces 200 MB: --limit reads only the first items, never the rest."""
    import gzip
    import struct
    import time

    n = 255_000  # x 28 x 28 = 200 MB of zeros, ~200 KB compressed
    path = tmp_path / "train-images-idx3-ubyte.gz"
    with gzip.open(path, "wb", compresslevel=1) as fh:
        fh.write(struct.pack(">iiii", 2051, n, 28, 28))
        block = bytes(28 * 28 * 5000)
        for _ in range(n // 5000):
            fh.write(block)
    assert path.stat().st_size < 2_000_000
    t0 = time.perf_counter()
    images = read_idx(path, 2051, limit=8)
    assert images.shape == (8, 28, 28) and time.perf_counter() - t0 < 1.0
    big = tmp_path / "huge.gz"
    big.write_bytes(gzip.compress(struct.pack(">iiii", 2051, 2**31 - 1, 2**15, 2**15)))
    with pytest.raises(UserError, match="more than"):  # a header that claims terabytes: refused unread
        read_idx(big, 2051)


def test_images_that_would_be_misread_are_refused(tmp_path):
    """16-bit PNGs (PIL would clip them to 255), decompression bombs, and npz files whose labels
    would be truncated (float) or fail (str), with 5 channels, zero height, or not a zip."""
    from PIL import Image

    for name, image in {"deep": Image.fromarray(np.full((4, 4), 40000, np.uint16)),
                        "bomb": Image.new("1", (9000, 9000))}.items():
        root = tmp_path / name / "cls"
        root.mkdir(parents=True)
        image.save(root / "a.png")
        with pytest.raises(UserError, match="more than 8 bits|pixels refused"):
            read_source(tmp_path / name, SourceFormat.folder)
    good = np.zeros((3, 4, 4, 3), np.uint8)
    cases = {"float-labels": (good, np.array([0.0, 1.7, 2.0])), "str-labels": (good, np.array(["a", "b", "c"])),
             "five-channels": (np.zeros((3, 4, 4, 5), np.uint8), np.arange(3)),
             "zero-height": (np.zeros((3, 0, 4, 3), np.uint8), np.arange(3))}
    for name, (image, label) in cases.items():
        np.savez(tmp_path / f"{name}.npz", image=image, label=label)
        with pytest.raises(UserError):
            read_source(tmp_path / f"{name}.npz", SourceFormat.npz)
    (tmp_path / "text.npz").write_text("not a zip")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04" + bytes(100))
    for name in ("text", "broken"):
        with pytest.raises(UserError, match="cannot read"):
            read_source(tmp_path / f"{name}.npz", SourceFormat.npz)


def _npy_bytes(header: dict, data: bytes) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, header)
    return buf.getvalue() + data


def test_npz_is_streamed_with_limit_and_bombs_are_refused_unread(tmp_path):
    """An npz is read member by member from its .npy headers: --limit reads only the first rows
    (compressed or not, C or Fortran order), and a header announcing more than MAX_SOURCE_BYTES,
    a member shorter or longer than its header, or object arrays are refused before any data is
    inflated."""
    import zipfile

    from pipeline.data.config import MAX_SOURCE_BYTES
    from pipeline.data.npz import read_npz

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (50, 6, 5, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, 50)
    np.savez_compressed(tmp_path / "c.npz", image=images, label=labels)
    np.savez(tmp_path / "f.npz", image=np.asfortranarray(images), label=labels)
    for name in ("c", "f"):
        for limit in (0, 7, 50, 80):
            got = read_npz(tmp_path / f"{name}.npz", limit)
            keep = limit or 50
            np.testing.assert_array_equal(got.images, images[:keep])
            np.testing.assert_array_equal(got.labels, labels[:keep])
    # two files under one root: the limit spans them in name order
    np.savez(tmp_path / "c2.npz", image=images[:5], label=labels[:5])
    both = read_source(tmp_path / "c.npz", SourceFormat.npz, limit=3)
    assert len(both["train"].labels) == 3

    huge = (2**20, 4096, 4096, 3)
    assert np.prod(huge, dtype=np.float64) > MAX_SOURCE_BYTES
    label_member = _npy_bytes({"descr": "<i8", "fortran_order": False, "shape": (2,)}, bytes(16))
    members = {
        "bomb": _npy_bytes({"descr": "|u1", "fortran_order": False, "shape": huge}, bytes(64)),
        "short": _npy_bytes({"descr": "|u1", "fortran_order": False, "shape": (2, 4, 4, 3)}, bytes(95)),
        "long": _npy_bytes({"descr": "|u1", "fortran_order": False, "shape": (2, 4, 4, 3)}, bytes(97)),
        "object": _npy_bytes({"descr": "|O", "fortran_order": False, "shape": (2, 4, 4, 3)}, bytes(8)),
        "negative": _npy_bytes({"descr": "|u1", "fortran_order": False, "shape": (-1, 4, 4, 3)}, bytes(2**16)),
    }
    for name, member in members.items():
        with zipfile.ZipFile(tmp_path / f"{name}.npz", "w", zipfile.ZIP_DEFLATED) as zf:
            zf.writestr("image.npy", member)
            zf.writestr("label.npy", label_member)
        with pytest.raises(UserError, match="more than|truncated or padded|object arrays|negative dim") as exc:
            read_source(tmp_path / f"{name}.npz", SourceFormat.npz)
        assert str(tmp_path / f"{name}.npz") in str(exc.value)


def _npz_shapes(root: Path) -> None:
    root.mkdir()
    np.savez(root / "a.npz", image=np.zeros((4, 8, 8, 3), np.uint8), label=np.zeros(4, np.int64))
    np.savez(root / "b.npz", image=np.zeros((4, 9, 9, 3), np.uint8), label=np.zeros(4, np.int64))


def _npz_huge_label(root: Path) -> None:
    root.mkdir()
    np.savez(root / "a.npz", image=np.zeros((4, 8, 8, 3), np.uint8), label=np.array([0, 1, 2, 10**12]))


def _cifar_string_labels(root: Path) -> None:
    root.mkdir()
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        (root / name).write_bytes(pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": ["a", "b"]}))
    (root / "batches.meta").write_bytes(pickle.dumps({b"label_names": [f"c{i}".encode() for i in range(10)]}))


@pytest.mark.parametrize("make,fmt,words", [
    (_npz_shapes, "npz", "images of different shapes"),
    (_npz_huge_label, "npz", "labels must be class indices"),  # a class list of 10^12 names: killed for memory
    (_cifar_string_labels, "cifar10", "'labels' must be integers"),
], ids=["npz-mismatched-shapes", "npz-label-1e12", "cifar-string-labels"])
def test_sources_that_crashed_are_one_line(tmp_path, capsys, make, fmt, words):
    from reliability_helpers import assert_one_error_line, run_cli

    make(tmp_path / "src")
    code, _, err = run_cli(capsys, ["prepare", "--source", tmp_path / "src", "--format", fmt, "--out", tmp_path / "o"])
    assert words in assert_one_error_line(code, err) and not (tmp_path / "o").exists()

"""prepare streams npz sets: block by block from the .npy members (stored or deflated), with
several processes, resumable; the shards are exactly those of the whole set read into memory."""

from __future__ import annotations

import json
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import shards, streamed
from pipeline.core.errors import UserError
from pipeline.core.shards import Split, make_keys, read_split, write_split
from pipeline.data.config import PrepareConfig
from pipeline.data.npz import NpzRows
from pipeline.data.order import stratified_order
from stages import prepare

N, SHAPE = 230, (6, 5, 3)


def _set(tmp_path: Path) -> tuple[Path, np.ndarray, np.ndarray]:
    """Three npz files under one folder (stored, deflated, stored) holding rows 0..N in name order."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (N, *SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, N)
    root = tmp_path / "src"
    root.mkdir()
    np.savez(root / "a.npz", image=images[:100], label=labels[:100])
    np.savez_compressed(root / "b.npz", image=images[100:170], label=labels[100:170])
    np.savez(root / "c.npz", image=images[170:], label=labels[170:].astype(np.uint8))
    return root, images, labels


def _files(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _reference(tmp_path: Path, root: Path, images: np.ndarray, labels: np.ndarray, encoding: str = "npy") -> Path:
    """The same rows as the in-memory writer writes them (what prepare wrote before it streamed)."""
    from pipeline.data.config import CIFAR10_CLASSES

    out = tmp_path / f"ref-{encoding}" / "train"
    extra = {"split": "train", "name": "g"} | ({"encoding": encoding} if encoding != "png" else {})
    write_split(out, Split(images, labels.astype(np.int64), CIFAR10_CLASSES), make_keys("g", "train", len(labels)),
                shard_size=64, source=str(root), extra=extra, progress=False, encoding=encoding)
    return out


def _prepare(src: Path, out: Path, **kw) -> dict:
    return prepare.run(PrepareConfig(source=str(src), format="npz", out=str(out), key_prefix="g", shard_size=64,
                                     **kw))["train"]


def test_rows_of_stored_and_deflated_members_in_any_order(tmp_path):
    root, images, labels = _set(tmp_path)
    with NpzRows(root, scratch=tmp_path) as rows:
        assert rows.n == N and rows.image_shape == SHAPE and [m.offset is None for m in rows.members] == [False, True, False]
        np.testing.assert_array_equal(rows.labels, labels)
        for a in range(0, N, 64):  # prepare's order: increasing contiguous blocks (one pass of a stream)
            np.testing.assert_array_equal(rows.read(np.arange(a, min(a + 64, N))), images[a:a + 64])
        perm = np.random.default_rng(1).permutation(N)  # a shuffle: random access (inflated once)
        np.testing.assert_array_equal(rows.read(perm), images[perm])
        assert len(list(tmp_path.glob(".npz-rows-*"))) == 1
    assert not list(tmp_path.glob(".npz-rows-*"))  # the inflated copy goes with the reader
    with NpzRows(root, limit=120) as rows:
        assert rows.n == 120 and len(rows.all_labels) == N
        with pytest.raises(IndexError):
            rows.read(np.array([120]))


@pytest.mark.parametrize("workers,encoding", [(1, "auto"), (2, "auto"), (2, "png")])
def test_a_streamed_npz_is_written_exactly_as_the_whole_set_read_into_memory(tmp_path, workers, encoding):
    """auto: npy members for an npz source; png on request. Either reads back as the same pixels."""
    root, images, labels = _set(tmp_path)
    fp = _prepare(root, tmp_path / "out", workers=workers, encoding=encoding)
    ref = _reference(tmp_path, root, images, labels, "png" if encoding == "png" else "npy")
    member = "png" if encoding == "png" else "npy"
    assert all(n.endswith((f".{member}", ".cls")) for n in tarfile.open(tmp_path / "out" / "train" / "shard-000000.tar").getnames())
    np.testing.assert_array_equal(read_split(tmp_path / "out" / "train").images, images)
    assert _files(tmp_path / "out" / "train") == _files(ref)  # shards and fingerprint, byte for byte
    assert fp["count"] == N and fp["content_hash"] == read_split(ref).fingerprint["content_hash"]
    assert not list((tmp_path / "out" / "train").glob("*.json.*")) and not (tmp_path / "out" / "train.tmp").exists()


def test_a_shuffled_limited_npz_equals_its_order_read_into_memory(tmp_path):
    root, images, labels = _set(tmp_path)
    fp = _prepare(root, tmp_path / "out", shuffle_seed=3, limit=150)
    order = stratified_order(labels.astype(np.int64), 3)[:150]
    got = read_split(tmp_path / "out" / "train")
    np.testing.assert_array_equal(got.images, images[order])
    assert got.keys == [f"g-train-{i:07d}" for i in order] and fp["order"]["shuffle_seed"] == 3
    assert not list(tmp_path.glob(".npz-rows-*"))


def test_an_interrupted_prepare_resumes_keeping_the_shards_it_wrote(tmp_path, monkeypatch):
    root, images, labels = _set(tmp_path)
    real = streamed._write_shard_job
    written: list[int] = []

    def dies_after_two(stage, s, *args):
        if len(written) == 2:
            raise KeyboardInterrupt
        written.append(s)
        return real(stage, s, *args)

    monkeypatch.setattr(streamed, "_write_shard_job", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _prepare(root, tmp_path / "out")
    staging = tmp_path / "out" / "train.tmp"
    assert not (tmp_path / "out" / "train").exists() and sorted(p.name for p in staging.glob("shard-*")) == [
        "shard-000000.tar", "shard-000000.tar.json", "shard-000001.tar", "shard-000001.tar.json"]
    (staging / "shard-000001.tar").write_bytes(b"damaged")  # a shard whose file no longer matches its record
    written.clear()
    monkeypatch.setattr(streamed, "_write_shard_job", lambda stage, s, *a: written.append(s) or real(stage, s, *a))
    _prepare(root, tmp_path / "out")
    assert written == [1, 2, 3]  # shard 0 kept; the damaged one and the rest written
    ref = _reference(tmp_path, root, images, labels)
    assert _files(tmp_path / "out" / "train") == _files(ref)
    # another plan (here a shard size) never reuses what an interrupted run of the first left
    monkeypatch.setattr(streamed, "_write_shard_job", dies_after_two)
    written.clear()
    with pytest.raises(KeyboardInterrupt):
        _prepare(root, tmp_path / "again")
    written.clear()
    monkeypatch.setattr(streamed, "_write_shard_job", lambda stage, s, *a: written.append(s) or real(stage, s, *a))
    prepare.run(PrepareConfig(source=str(root), format="npz", out=str(tmp_path / "again"), key_prefix="g",
                              shard_size=50))
    assert written == [0, 1, 2, 3, 4]


def test_a_truncated_or_padded_member_is_refused_before_any_shard(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (20, *SHAPE), dtype=np.uint8)
    for name, cut in (("short", -5), ("long", 5)):
        np.save(tmp_path / "img.npy", images)
        data = (tmp_path / "img.npy").read_bytes()
        data = data[:cut] if cut < 0 else data + bytes(cut)
        for method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
            path = tmp_path / f"{name}-{method}.npz"
            with zipfile.ZipFile(path, "w", method) as zf:
                zf.writestr("image.npy", data)
                np.save(tmp_path / "lab.npy", np.arange(20) % 10)
                zf.write(tmp_path / "lab.npy", "label.npy")
            with pytest.raises(UserError, match="truncated or padded"):
                _prepare(path, tmp_path / f"out-{name}-{method}")
            assert not (tmp_path / f"out-{name}-{method}").exists()
    np.savez(tmp_path / "fortran.npz", image=np.asfortranarray(images), label=np.arange(20) % 10)
    with pytest.raises(UserError, match="Fortran order"):
        _prepare(tmp_path / "fortran.npz", tmp_path / "out-f")


def test_the_content_hash_is_built_as_the_blocks_come():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (10, 2, 2, 1), dtype=np.uint8)
    keys, labels = [f"k-{i}" for i in range(10)], np.arange(10)
    h = shards.ContentHash([keys[:3], [], keys[3:]])
    for a in range(0, 10, 4):
        h.update(images[a:a + 4])
    assert h.finish(labels) == shards.content_hash(keys, images, labels)
    assert shards.ContentHash([]).finish(np.zeros(0)) == shards.content_hash([], np.zeros((0, 1, 1, 1), np.uint8), [])
    assert json.dumps([]) == "[]"

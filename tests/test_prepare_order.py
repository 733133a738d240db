"""prepare and row order: a label-sorted source is refused (or, with --shuffle-seed, written in a
stratified order whose every prefix is class-balanced); an already shuffled source is unchanged."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.core.errors import UserError
from pipeline.core.shards import Split, make_keys, read_split, write_split
from pipeline.data.config import PrepareConfig
from pipeline.data.order import label_order, stratified_order
from pipeline.data.sources import read_idx
from stages import prepare

ROOT = Path(__file__).resolve().parents[1]
CLASSES, PER_CLASS = 10, 20


def _sorted_folder(root: Path, classes: int = CLASSES, per_class: int = PER_CLASS) -> Path:
    """ROOT/cCC/iii.png, read class by class: pixel (0,0) holds the class, (0,1) the index in it."""
    rng = np.random.default_rng(0)
    for c in range(classes):
        (root / f"c{c:02d}").mkdir(parents=True)
        for i in range(per_class):
            img = rng.integers(0, 256, (8, 8), dtype=np.uint8)
            img[0, 0], img[0, 1] = c, i
            Image.fromarray(img).save(root / f"c{c:02d}" / f"{i:03d}.png")
    return root


def _prepare(src: Path, out: Path, **kw) -> dict:
    return prepare.run(PrepareConfig(source=str(src), format="folder", out=str(out), key_prefix="s",
                                     shard_size=64, **kw))


def test_a_label_sorted_folder_is_refused_in_one_line_and_leaves_nothing(tmp_path):
    src = _sorted_folder(tmp_path / "src")
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "pipeline", "prepare", "--source", str(src), "--format",
                           "folder", "--out", str(out)], capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: "), proc.stderr
    assert "sorted by label" in proc.stderr and "--shuffle-seed" in proc.stderr
    assert not out.exists() and not list(tmp_path.rglob("fingerprint.json"))
    with pytest.raises(UserError, match="--shuffle-seed"):  # a prefix of it too: judged on the whole split
        _prepare(src, out, limit=30)
    assert not out.exists()


def test_shuffle_seed_writes_every_row_once_in_a_class_balanced_reproducible_order(tmp_path):
    src = _sorted_folder(tmp_path / "src")
    fp = _prepare(src, tmp_path / "a", shuffle_seed=0)["train"]
    got = read_split(tmp_path / "a" / "train")
    n = CLASSES * PER_CLASS
    assert fp["count"] == n and fp["order"] == {"shuffle_seed": 0, "method": "stratified",
                                                "source_label_ordered": True, "source_label_changes": 9}
    for k in range(1, PER_CLASS + 1):  # every prefix of length 10k holds exactly k of each class
        assert np.bincount(got.labels[:CLASSES * k], minlength=CLASSES).tolist() == [k] * CLASSES
    # every source row exactly once, its image with its own label under its own source-index key
    assert sorted(got.keys) == make_keys("s", "train", n)
    np.testing.assert_array_equal(got.images[:, 0, 0, 0], got.labels)
    source_index = got.labels * PER_CLASS + got.images[:, 0, 1, 0]
    assert [int(k.rsplit("-", 1)[1]) for k in got.keys] == source_index.tolist()
    assert not label_order(got.labels)["ordered"]
    # reproducible with the seed, another order with another seed
    again = _prepare(src, tmp_path / "b", shuffle_seed=0)["train"]
    other = _prepare(src, tmp_path / "c", shuffle_seed=1)["train"]
    assert again["content_hash"] == fp["content_hash"] and again["shards_digest"] == fp["shards_digest"]
    assert other["content_hash"] != fp["content_hash"] and other["order"]["shuffle_seed"] == 1
    assert read_split(tmp_path / "c" / "train").keys != got.keys
    # --limit then keeps a balanced prefix of that order
    head = _prepare(src, tmp_path / "d", shuffle_seed=0, limit=30)["train"]
    assert head["count"] == 30 and read_split(tmp_path / "d" / "train").keys == got.keys[:30]


def test_stratified_prefixes_stay_within_one_row_of_each_class_share():
    rng = np.random.default_rng(3)
    for trial in range(40):
        sizes = rng.integers(1, 40, rng.integers(1, 8))
        labels = np.repeat(np.arange(len(sizes)), sizes)
        order = stratified_order(labels, trial)
        assert sorted(order.tolist()) == list(range(len(labels)))
        m = np.arange(1, len(labels) + 1)
        for k, size in enumerate(sizes):
            counts, share = np.cumsum(labels[order] == k), m * size / len(labels)
            assert np.all(counts >= np.floor(share)) and np.all(counts <= np.ceil(share)), (sizes, k)


def test_what_counts_as_label_ordered():
    rng = np.random.default_rng(0)
    sorted_labels = np.repeat(np.arange(10), 20)
    assert label_order(sorted_labels)["ordered"]
    assert label_order(np.tile(np.repeat(np.arange(10), 8), 5))["ordered"]  # classes in runs of 8
    assert not label_order(rng.permutation(sorted_labels))["ordered"]
    assert not label_order(np.zeros(500, np.int64))["ordered"]  # one class
    assert not label_order(np.array([0, 0, 0, 1, 1, 1]))["ordered"]  # too few rows to judge
    imbalanced = np.r_[np.zeros(990, np.int64), np.ones(10, np.int64)]
    assert label_order(imbalanced)["ordered"] and not label_order(rng.permutation(imbalanced))["ordered"]


def test_a_label_sorted_npz_is_refused_even_when_limit_reads_one_class(tmp_path):
    """--limit reads only a prefix of a streamed source's images; the order is judged by all labels."""
    labels = np.repeat(np.arange(4), 25)
    path = tmp_path / "gen.npz"
    np.savez(path, image=np.zeros((100, 4, 4, 1), np.uint8), label=labels)
    with pytest.raises(UserError, match="sorted by label"):
        prepare.run(PrepareConfig(source=str(path), out=str(tmp_path / "o"), limit=10))
    fp = prepare.run(PrepareConfig(source=str(path), out=str(tmp_path / "o"), limit=12, shuffle_seed=5))["train"]
    assert np.bincount(read_split(tmp_path / "o" / "train").labels).tolist() == [3, 3, 3, 3]
    assert fp["order"]["shuffle_seed"] == 5


def test_fashion_mnist_is_written_exactly_as_before(tmp_path, fmnist_shards, fmnist_dir):
    """Default prepare of the (shuffled) IDX source: the fixture's shards are what writing the first
    512 IDX rows in source order gives, byte for byte (fingerprint and every tar), with no order record."""
    images = read_idx(fmnist_dir / "train-images-idx3-ubyte.gz", 2051)[:512, ..., None].copy()
    labels = read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz", 2049)[:512].astype(np.int64)
    assert not label_order(read_idx(fmnist_dir / "train-labels-idx1-ubyte.gz", 2049))["ordered"]
    classes = json.loads((fmnist_shards / "train" / "fingerprint.json").read_text())["classes"]
    write_split(tmp_path / "train", Split(images, labels, classes), make_keys("fmnist", "train", 512),
                shard_size=200, source=str(fmnist_dir), extra={"split": "train", "name": "fmnist"}, progress=False)
    for path in sorted((tmp_path / "train").iterdir()):
        assert (fmnist_shards / "train" / path.name).read_bytes() == path.read_bytes(), path.name
    assert "order" not in json.loads((fmnist_shards / "train" / "fingerprint.json").read_text())


def test_shuffle_seed_is_opt_in_on_a_shuffled_source_and_checked(tmp_path):
    labels = np.random.default_rng(1).permutation(np.repeat(np.arange(4), 25))
    images = np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(4, 1).repeat(4, 2)
    path = tmp_path / "gen.npz"
    np.savez(path, image=images, label=labels)
    plain = prepare.run(PrepareConfig(source=str(path), out=str(tmp_path / "plain")))["train"]
    got = read_split(tmp_path / "plain" / "train")
    assert "order" not in plain and got.images[:, 0, 0, 0].tolist() == list(range(100))
    mixed = prepare.run(PrepareConfig(source=str(path), out=str(tmp_path / "mixed"), shuffle_seed=2))["train"]
    assert mixed["order"]["source_label_ordered"] is False and mixed["content_hash"] != plain["content_hash"]
    rows = read_split(tmp_path / "mixed" / "train")
    np.testing.assert_array_equal(labels[rows.images[:, 0, 0, 0]], rows.labels)  # images keep their labels
    for k in range(1, 26):
        assert np.bincount(rows.labels[:4 * k], minlength=4).tolist() == [k] * 4
    with pytest.raises(UserError, match="--shuffle-seed must be >= 0"):
        prepare.run(PrepareConfig(source=str(tmp_path / "absent"), out=str(tmp_path / "o"), shuffle_seed=-2))

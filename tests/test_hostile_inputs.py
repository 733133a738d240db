"""Inputs forged by a hostile sender: sample keys and tar member names that could escape a
folder, shard sets with repeated keys, out-of-range labels, shard names outside the folder or a
device as a shard, prefix reads checked against forged records and digests, model pointers in a
loop and checkpoint configs that are not what they claim; each is refused with a UserError.
"""

from __future__ import annotations

import io
import json
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.core import shards as shards_mod
from pipeline.core.errors import UserError
from pipeline.core.members import encode_png
from pipeline.core.shards import Split, check_key, read_split, write_split
from pipeline.diffusion.model import load_model


@pytest.mark.parametrize("key", ["../x", "../../etc/passwd", "a/b", "/abs", "a.b", ".", "..", "",
                                 "x" * 129, "a\\b", "a b", "key\n", "ü"])
def test_keys_that_could_escape_are_refused(key):
    with pytest.raises(UserError, match="invalid sample key"):
        check_key(key)


def test_good_keys_pass():
    assert check_key("fmnist-train-0000001") == "fmnist-train-0000001"
    assert check_key("syn_train-" + "9" * 100)


def test_write_split_refuses_escaping_keys_without_output(tmp_path):
    split = Split(np.zeros((2, 4, 4, 1), np.uint8), np.array([0, 1]), ["a", "b"])
    with pytest.raises(UserError, match="invalid sample key"):
        write_split(tmp_path / "out" / "train", split, ["ok-0", "../evil"], progress=False)
    assert not (tmp_path / "out" / "train").exists() and not (tmp_path / "evil.png").exists()


@pytest.mark.parametrize("member", ["../evil", "sub/evil", "/abs/evil"])
def test_shards_with_escaping_member_names_are_refused(tmp_path, member):
    """A tar from elsewhere whose member names climb out: refused when read, nothing extracted."""
    split = tmp_path / "split"
    split.mkdir()
    shard = split / "shard-000000.tar"
    png = encode_png(np.zeros((4, 4, 1), np.uint8))
    with tarfile.open(shard, "w") as tar:
        for ext, data in (("png", png), ("cls", b"0")):
            info = tarfile.TarInfo(f"{member}.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    fp = {"count": 1, "image_shape": [4, 4, 1], "classes": ["a"], "num_classes": 1, "content_hash": "",
          "shards": [{"name": shard.name, "count": 1, "sha256": shards_mod.file_sha256(shard)}]}
    (split / "fingerprint.json").write_text(json.dumps(fp))
    with pytest.raises(UserError):
        read_split(split)
    assert not (tmp_path / "evil.png").exists() and not Path("/abs").exists()



def _foreign_split(folder: Path, keys: list[str], images: np.ndarray, labels: np.ndarray, *,
                   classes: int = 10, shard_size: int = 4) -> Path:
    """Shards written the way a stranger could: any keys, labels and names, a consistent fingerprint."""
    from pipeline.core.shards import content_hash, finish_split, make_fingerprint, write_shard

    folder.mkdir(parents=True)
    records = [write_shard(folder, s, keys[a:a + shard_size], images[a:a + shard_size], labels[a:a + shard_size])
               for s, a in enumerate(range(0, len(keys), shard_size))]
    fp = make_fingerprint(keys, list(images.shape[1:]), [str(c) for c in range(classes)], records,
                          content_hash(keys, images, labels))
    finish_split(folder, fp)
    return folder


def test_foreign_shards_that_would_mix_data_are_refused(tmp_path):
    """Repeated keys (a join by key would take one of them), labels outside the classes, shard
    names that leave the folder: one line each, whole split or prefix alike."""
    from pipeline.core.shards import read_split, shards_digest

    images = np.random.default_rng(0).integers(0, 256, (8, 6, 6, 1), dtype=np.uint8)
    labels = np.arange(8) % 10
    keys = [f"x-train-{i:07d}" for i in range(8)]
    dup = _foreign_split(tmp_path / "dup", keys[:5] + keys[:3], images, labels)
    for limit in (0, 6):
        with pytest.raises(UserError, match="occurs more than once"):
            read_split(dup, limit=limit)
    neg = _foreign_split(tmp_path / "neg", keys, images, np.r_[labels[:7], -1])
    with pytest.raises(UserError, match=r"labels outside \[0, 10\)"):
        read_split(neg)
    fp = json.loads((neg / "fingerprint.json").read_text())
    fp["shards"][0]["name"] = "../../../etc/hostname"
    fp["shards_digest"] = shards_digest(fp["shards"])  # resealed, as a sender who knows the format would
    (neg / "fingerprint.json").write_text(json.dumps(fp))
    with pytest.raises(UserError, match="not shard-NNNNNN.tar"):
        read_split(neg)


def test_a_shard_that_is_a_device_is_refused_unread(fmnist_shards, tmp_path):
    import os

    from pipeline.core.shards import read_split

    split = tmp_path / "train"
    shutil.copytree(fmnist_shards / "train", split)
    (split / "shard-000000.tar").unlink()
    os.symlink("/dev/zero", split / "shard-000000.tar")
    with pytest.raises(UserError, match="not a regular file"):
        read_split(split)


def test_model_pointer_loop_and_checkpoint_config_not_an_object(tmp_path, checkpoint):
    from pipeline.classifiers.zoo import load_classifier

    a, b = tmp_path / "a", tmp_path / "b"
    for here, there in ((a, b), (b, a)):  # two pointers at each other
        here.mkdir()
        (here / "model_info.json").write_text(json.dumps({"source": str(there)}))
    with pytest.raises(UserError, match="pointers in a row"):
        load_model(str(a))
    (a / "model_info.json").write_text("[1, 2]")
    with pytest.raises(UserError, match="JSON object"):
        load_model(str(a))
    bad = tmp_path / "ckpt"
    shutil.copytree(checkpoint, bad)
    for text in ("[1, 2, 3]", json.dumps({"arch": ["cnn"], "in_channels": 1, "num_classes": 10, "image_size": 28}),
                 json.dumps({"arch": "cnn", "in_channels": 1, "num_classes": 10**9, "image_size": 28})):
        (bad / "config.json").write_text(text)
        with pytest.raises(UserError):
            load_classifier(bad)


def test_a_prefix_read_is_checked_against_the_data_it_claims(tmp_path):
    """Reading the first shards only: each is checked against its record (keys, pixels, labels) and
    the records against the fingerprint's shards_digest, which the cache records too."""
    import hashlib

    from pipeline.core.shards import read_split, shards_digest, write_shard

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 6, 6, 1), dtype=np.uint8)
    keys = [f"x-train-{i:07d}" for i in range(8)]
    split = _foreign_split(tmp_path / "s", keys, images, np.arange(8) % 10)
    original = read_split(split, limit=4)
    fp = json.loads((split / "fingerprint.json").read_text())
    assert original.fingerprint["shards_digest"] == shards_digest(fp["shards"])
    # shard 0 swapped for other pixels under the same keys, its file checksum updated
    write_shard(split, 0, keys[:4], 255 - images[:4], np.arange(4))
    fp["shards"][0]["sha256"] = hashlib.sha256((split / "shard-000000.tar").read_bytes()).hexdigest()
    (split / "fingerprint.json").write_text(json.dumps(fp))
    with pytest.raises(UserError, match="shards_digest"):
        read_split(split, limit=4)
    fp["shards_digest"] = shards_digest(fp["shards"])  # resealed: the shard no longer matches its record
    (split / "fingerprint.json").write_text(json.dumps(fp))
    with pytest.raises(UserError, match="differ from the shard's record"):
        read_split(split, limit=4)
    fp["shards"][0]["content"] = json.loads(json.dumps(
        write_shard(tmp_path, 0, keys[:4], 255 - images[:4], np.arange(4))))["content"]
    fp["shards_digest"] = shards_digest(fp["shards"])  # a full forgery reads, but under another digest
    (split / "fingerprint.json").write_text(json.dumps(fp))
    assert read_split(split, limit=4).fingerprint["shards_digest"] != original.fingerprint["shards_digest"]


@pytest.mark.parametrize("edit", [
    lambda fp: {**fp, "shards": [1, 2]}, lambda fp: {**fp, "shards": ["x"]}, lambda fp: {**fp, "shards": 5},
    lambda fp: {**fp, "image_shape": 5}, lambda fp: {**fp, "count": "8"}, lambda fp: {**fp, "classes": [1, 2]},
    lambda fp: [1, 2], lambda fp: None,
], ids=["shards-ints", "shards-strings", "shards-int", "image-shape-int", "count-string", "classes-ints",
        "a-list", "null"])
def test_a_fingerprint_of_the_wrong_shape_is_one_line(tmp_path, capsys, edit, model_dir):
    """A foreign shard set whose fingerprint lists non-objects (or is not an object at all): read
    anywhere (read_split, extract's inputs), one line, not an AttributeError or TypeError."""
    from reliability_helpers import assert_one_error_line, run_cli

    from pipeline.core.shards import read_split

    images = np.random.default_rng(0).integers(0, 256, (8, 6, 6, 1), dtype=np.uint8)
    split = _foreign_split(tmp_path / "real" / "train", [f"x-train-{i:07d}" for i in range(8)], images,
                           np.arange(8) % 10)
    (split / "fingerprint.json").write_text(json.dumps(edit(json.loads((split / "fingerprint.json").read_text()))))
    with pytest.raises(UserError, match="malformed fingerprint"):
        read_split(split)
    code, _, err = run_cli(capsys, ["extract", "--model", model_dir, "--real-splits", tmp_path / "real", "--synthetic", "",
                                    "--out", tmp_path / "f.zarr"])
    assert "malformed fingerprint" in assert_one_error_line(code, err) and not (tmp_path / "f.zarr").exists()

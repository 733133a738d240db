"""Images stored in the cache and streamed with their targets (issue 18): extract writes each
trained part's images in row order, training over its memory budget reads them chunk by chunk,
and a store whose images are not the split's is refused even when its manifest was re-made."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from reliability_helpers import assert_one_error_line, extract_cfg, run_cli, train_cfg

from pipeline.cache.store import IMAGES, CacheWriter, cache_info, open_cache, verify_cache
from pipeline.core.errors import UserError
from pipeline.core.shards import read_fingerprint, read_split
from pipeline.train import trainer
from pipeline.train.data import check_stored_images
from pipeline.train.runtime import Runtime
from stages import extract, train


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir, fmnist_shards) -> Path:
    """256 train rows: the split's first shard (200 rows) whole and the second cut at 56 rows."""
    out = tmp_path_factory.mktemp("img-cache") / "feats.zarr"
    extract.run(extract_cfg(model_dir, fmnist_shards, out, limit=256, rows_per_chunk=32, chunks_per_shard=2))
    return out


def _forged(store: Path, tmp_path: Path, row: int) -> Path:
    """A copy whose image of ``row`` was changed, with the manifest and digest made anew: what a
    hostile sender can do to any file of a store (only the data itself can tell)."""
    bad = tmp_path / "forged.zarr"
    shutil.copytree(store, bad)
    group = zarr.open_group(str(bad), mode="r+")
    img = group["train"][IMAGES][row]
    group["train"][IMAGES][row] = 255 - img
    CacheWriter(str(bad), group, 0).finalize({})
    assert verify_cache(str(bad)) == []  # the manifest vouches for the forged store
    return bad


def test_extract_stores_the_trained_parts_images_in_row_order(store, fmnist_shards, model_dir, tmp_path):
    cache = open_cache(str(store))
    train_part = cache.part("train")
    ss = read_split(fmnist_shards / "train", limit=256)
    assert train_part.has_images and train_part.image_shape == (28, 28, 1)
    assert np.array_equal(train_part.read_images(0, 256), ss.images)
    assert np.array_equal(train_part.read_image_chunk(7), ss.images[224:256])
    assert not cache.part("test").has_images  # never trained on: its images stay in the shards
    assert "images" in cache_info(str(store)) and "streamed with the targets" in cache_info(str(store))
    plain = tmp_path / "plain.zarr"
    extract.run(extract_cfg(model_dir, fmnist_shards, plain, images=False))
    assert not open_cache(str(plain)).part("train").has_images


def test_stored_images_are_checked_against_the_splits_records(store, fmnist_shards, tmp_path):
    """Rows of a shard the cache holds whole are hashed against its content record (even when N
    cuts it: no tar is read); rows of a shard the cache cuts are compared with the shard itself.
    Either way a changed image is found."""
    fp_path = str(fmnist_shards / "train")
    fp = read_fingerprint(fp_path)
    part = open_cache(str(store)).part("train")
    check_stored_images(part, fp_path, fp, 256)  # the real thing passes
    for row, where in ((5, "rows 0..200"), (230, "rows 200..256")):
        bad = open_cache(str(_forged(store, tmp_path / str(row), row))).part("train")
        with pytest.raises(UserError, match=f"train {where}: the images, keys or labels the cache stores differ"):
            check_stored_images(bad, fp_path, fp, 256)
    with pytest.raises(UserError, match="train rows 0..200: the images"):  # shard 0 is hashed whole
        check_stored_images(open_cache(str(tmp_path / "5" / "forged.zarr")).part("train"), fp_path, fp, 4)
    check_stored_images(bad, fp_path, fp, 4)  # rows of shards training does not reach are not its concern


def test_training_over_budget_streams_images_and_refuses_forged_ones(store, fmnist_shards, tmp_path, capsys):
    rt = Runtime("cpu")
    data = trainer.open_data(train_cfg(store, tmp_path / "x", memory_budget_mb=0), rt)
    assert data.images == data.mode == "stream" and data.chunked == {"train": 32}
    assert data.real.image_shape == (1, 28, 28)
    assert trainer.open_data(train_cfg(store, tmp_path / "x"), rt).images == "ram"  # within the budget
    m = train.run(train_cfg(store, tmp_path / "run", memory_budget_mb=0, max_steps=3))
    assert m["image_mode"] == "stream" and m["target_mode"] == "stream" and m["budget"]["steps"] == 3
    bad = _forged(store, tmp_path / "forged", 5)  # a copy elsewhere: its split is named with --real-shards
    code, _, err = run_cli(capsys, ["train", "--cache", bad, "--out", tmp_path / "refused", "--memory-budget-mb", "0",
                                    "--real-limit", "0", "--max-steps", "1", "--real-shards", fmnist_shards / "train"])
    assert "the images, keys or labels the cache stores differ" in assert_one_error_line(code, err)
    assert not (tmp_path / "refused").exists()
    # --no-verify trusts the store (documented): the check is part of the verification
    assert trainer.open_data(train_cfg(bad, tmp_path / "y", memory_budget_mb=0, verify=False), rt).images == "stream"


def test_a_cache_without_images_streams_targets_and_keeps_images_in_ram(model_dir, fmnist_shards, tmp_path, capsys):
    plain = tmp_path / "plain.zarr"
    extract.run(extract_cfg(model_dir, fmnist_shards, plain, images=False))
    capsys.readouterr()
    data = trainer.open_data(train_cfg(plain, tmp_path / "x", memory_budget_mb=0), Runtime("cpu"))
    assert data.mode == "stream" and data.images == "ram"
    assert "stores no images (extracted with --no-images)" in capsys.readouterr().out


def test_a_damaged_image_shard_is_rewritten_on_resume(store, model_dir, fmnist_shards, tmp_path):
    """Images are resumed like a target set: a shard whose file no longer matches its record is
    the only thing extract recomputes."""
    copy = tmp_path / "feats.zarr"
    shutil.copytree(store, copy)
    group = zarr.open_group(str(copy), mode="r+")
    shard = copy / "train" / IMAGES / "c" / "1" / "0" / "0" / "0"
    shard.write_bytes(shard.read_bytes()[:-10])
    writer = CacheWriter(str(copy), group, 64)
    assert writer.missing_shards("train") == {1: [IMAGES]}
    assert verify_cache(str(copy))  # damaged: refused until repaired
    extract.run(extract_cfg(model_dir, fmnist_shards, copy, limit=256, rows_per_chunk=32, chunks_per_shard=2))
    assert verify_cache(str(copy)) == []
    assert np.array_equal(open_cache(str(copy)).part("train").read_images(0, 256),
                          read_split(fmnist_shards / "train", limit=256).images)


@pytest.mark.parametrize("value", ["yes", 1])
def test_a_malformed_images_attribute_is_one_line(store, tmp_path, value):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    zarr.open_group(str(bad / "train"), mode="r+").attrs["images"] = value
    with pytest.raises(UserError, match="malformed attribute images"):
        open_cache(str(bad)).part("train")


def test_images_of_another_shape_are_refused(store, tmp_path):
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    g = zarr.open_group(str(bad / "train"), mode="r+")
    fp = dict(g.attrs["fingerprint"])
    g.attrs["fingerprint"] = {**fp, "image_shape": [28, 28, 3]}
    with pytest.raises(UserError, match="do not match uint8"):
        open_cache(str(bad)).part("train")


def test_a_malformed_shard_record_is_one_line(store):
    from pipeline.core.shards import shards_digest

    records = [{"name": "shard-000000.tar", "count": "200", "sha256": "", "content": ""}]
    part = open_cache(str(store)).part("train")
    with pytest.raises(UserError, match="malformed shard record"):
        check_stored_images(part, "x", {"shards": records, "shards_digest": shards_digest(records)}, 10)
    with pytest.raises(UserError, match="shards_digest"):
        check_stored_images(part, "x", {"shards": records, "shards_digest": "0" * 64}, 10)

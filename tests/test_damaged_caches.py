"""Damaged feature caches: `cache verify` names each kind of damage (flipped bit, truncated or
missing shard, NaNs, no completion marker, a foreign normalisation) and `train` refuses such a
store before building a model, with one ``error:`` line and no output folder, in-process and
through a real ``python -m pipeline`` process; damage in a part train does not read is not its
business.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from reliability_helpers import TRAIN_ARGS, _no_training, assert_one_error_line, run_cli, train_cfg

from pipeline.cache import store as cache_mod
from pipeline.cache.store import verify_cache
from pipeline.train import trainer

ROOT = Path(__file__).resolve().parents[1]


def _feature_file(url: Path, part: str = "train", array: str = "") -> Path:
    """A data file of an array of the part (default: the default target set's features)."""
    attrs = json.loads((url / "zarr.json").read_text())["attributes"]
    array = array or f"targets/{attrs['default_target']}/features"
    key = next(k for k in attrs["manifest"] if k.startswith(f"{part}/{array}/c/"))
    return url / key


def _flip(url: Path) -> None:
    path = _feature_file(url)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01  # one bit
    path.write_bytes(bytes(data))


def _truncate(url: Path) -> None:
    path = _feature_file(url)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip_labels(url: Path) -> None:
    path = _feature_file(url, array="labels")
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01
    path.write_bytes(bytes(data))


def _delete(url: Path) -> None:
    _feature_file(url).unlink()


def _nan(url: Path) -> None:
    """NaNs written as a diverged model would produce them: checksums recorded after the fact."""
    group = cache_mod.open_group(str(url), "r+")
    feats = group[f"train/targets/{group.attrs['default_target']}/features"]
    block = feats[0:32]
    block[3, 1, :5] = np.nan
    feats[0:32] = block
    cache_mod.CacheWriter(str(url), group, 32).finalize({})


def _no_marker(url: Path) -> None:
    meta = json.loads((url / "zarr.json").read_text())
    del meta["attributes"]["complete"]
    (url / "zarr.json").write_text(json.dumps(meta))


DAMAGE = {  # name -> (damage, words the refusal must contain)
    "flipped-bit": (_flip, "checksum mismatch"),
    "truncated-shard": (_truncate, "checksum mismatch"),
    "flipped-label-byte": (_flip_labels, "train/labels"),
    "missing-shard": (_delete, "missing file"),
    "nan": (_nan, "NaN/Inf"),
    "no-complete-marker": (_no_marker, "complete"),
}


def test_intact_store_passes_verify(store):
    assert verify_cache(str(store)) == []
    assert verify_cache(str(store), parts=("train",)) == []


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_train_refuses_damaged_store(store, tmp_path, capsys, monkeypatch, damage):
    fn, words = DAMAGE[damage]
    monkeypatch.setattr(trainer, "build_model", _no_training)  # refused before the model is even built
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    fn(bad)
    code, out, err = run_cli(capsys, ["cache", "verify", bad])
    assert code == 2 and words in out, out  # verify names the problem, one line each
    out_dir = tmp_path / "run"
    code, _, err = run_cli(capsys, ["train", "--cache", bad, "--out", out_dir, *TRAIN_ARGS])
    line = assert_one_error_line(code, err)
    assert code == 2 and words in line, line
    assert not out_dir.exists()  # refused before training: nothing written


def test_other_normalisation_refused_before_training(store, tmp_path, capsys, monkeypatch):
    """Attributes are not data files (no checksum): check_against catches a foreign convention."""
    other = tmp_path / "other.zarr"
    shutil.copytree(store, other)
    meta = json.loads((other / "zarr.json").read_text())
    meta["attributes"]["normalisation"] = "x"  # images fed in [0, 1], not [-1, 1]
    (other / "zarr.json").write_text(json.dumps(meta))
    monkeypatch.setattr(trainer, "build_model", _no_training)
    code, _, err = run_cli(capsys, ["train", "--cache", other, "--out", tmp_path / "run", *TRAIN_ARGS])
    assert "normalisation" in assert_one_error_line(code, err) and not (tmp_path / "run").exists()


def test_damage_in_an_unused_part_does_not_block_training(store, tmp_path):
    """train checks what it reads: a damaged test part (the probe's) is not its business."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    path = _feature_file(bad, part="test")
    path.write_bytes(path.read_bytes()[:-10])
    assert any(p.startswith("test/targets/") and "/features/" in p for p in verify_cache(str(bad)))
    trainer.refuse_damaged(train_cfg(bad, tmp_path / "x"))  # no exception


def test_damaged_store_refused_by_a_real_process(store, tmp_path):
    """The same through `python -m pipeline`: a clean stderr of exactly one line, exit 2."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    _flip(bad)
    proc = subprocess.run([sys.executable, "-m", "pipeline", "train", "--cache", str(bad),
                           "--out", str(tmp_path / "run"), *TRAIN_ARGS],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and "checksum mismatch" in lines[0], proc.stderr
    assert not (tmp_path / "run").exists()



def test_a_group_where_a_feature_array_belongs_gets_a_clear_answer(store, tmp_path, capsys, monkeypatch):
    """A hostile store: the target set's features are a group, not an array. `cache info` still
    summarises the store, verify names the changed file, train refuses in one line."""
    monkeypatch.setattr(trainer, "build_model", _no_training)
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    meta = bad / "train" / "targets" / "t100-mid_block" / "features" / "zarr.json"
    meta.write_text(json.dumps({"zarr_format": 3, "node_type": "group", "attributes": {}}))
    out = cache_mod.cache_info(str(bad))
    assert "t100-mid_block: unreadable" in out and "part test" in out, out
    code, out, _ = run_cli(capsys, ["cache", "verify", bad])
    assert code == 2 and "train/targets/t100-mid_block/features/zarr.json" in out, out
    code, _, err = run_cli(capsys, ["train", "--cache", bad, "--out", tmp_path / "run", *TRAIN_ARGS])
    assert_one_error_line(code, err)
    assert not (tmp_path / "run").exists()

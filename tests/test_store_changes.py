"""A store that changes under a run that streams from it (re-extracted, `dvc checkout`, a sender
replacing it: nothing locks an object store). A shard that disappears would read back as zarr's
fill value (zero targets, black images) and a changed one fails in the codec: both stop the read
with one line, a streaming run re-checks the store (digest and every file of its parts against
the manifest) before each checkpoint, and never marks a checkpoint made on a changed store; once
the store is restored, ``--resume`` finishes the run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import pytest
from reliability_helpers import assert_one_error_line, run_cli, train_cfg

from pipeline.cache.store import StoreChanged, open_cache
from pipeline.train import trainer
from stages import train


def _shard(url: Path, array: str, s: int) -> Path:
    """The file of zarr shard ``s`` (rows) of a train-part array (``features`` = the default set's)."""
    attrs = json.loads((url / "zarr.json").read_text())["attributes"]
    path = f"train/targets/{attrs['default_target']}/features" if array == "features" else f"train/{array}"
    hits = [k for k in attrs["manifest"] if k.startswith(f"{path}/c/{s}/")]
    assert len(hits) == 1, hits
    return url / hits[0]


@pytest.fixture
def copy(store, tmp_path) -> Path:
    shutil.copytree(store, tmp_path / "c.zarr")
    return tmp_path / "c.zarr"


@pytest.mark.parametrize("array", ["features", "images"])
def test_a_read_refuses_a_shard_that_is_gone_or_changed(copy, array):
    part = open_cache(str(copy)).part("train")
    read = part.read_chunk if array == "features" else part.read_image_chunk
    first = read(0)
    path = _shard(copy, array, 1)  # rows 32-63: chunks 2 and 3
    saved = path.read_bytes()
    path.unlink()
    with pytest.raises(StoreChanged, match="c/1/.*gone since the cache was verified"):
        read(2)
    assert (read(0) == first).all()  # the shards that are there still read
    path.write_bytes(saved[: len(saved) // 2])
    with pytest.raises(StoreChanged, match="no longer decode"):
        read(3)
    path.write_bytes(saved)
    assert read(3).shape[0] == 16


@pytest.mark.parametrize("change", ["gone", "edited"])
def test_a_streaming_run_stops_on_a_changed_store_and_resumes_once_restored(copy, tmp_path, capsys, monkeypatch,
                                                                             change):
    out = tmp_path / "run"
    cfg = train_cfg(copy, out, memory_budget_mb=0, epochs=2, dra_weight=0.5)
    path = _shard(copy, "features", 0)
    saved = path.read_bytes()
    step = trainer.Trainer.step

    def step_then_change(self, global_step, batch, inputs):
        if global_step == 0:  # the first epoch's chunks are read: the change shows at its checkpoint
            path.unlink() if change == "gone" else path.write_bytes(saved[:-7] + bytes(7))
        return step(self, global_step, batch, inputs)

    monkeypatch.setattr(trainer.Trainer, "step", step_then_change)
    argv = ["train", "--cache", copy, "--out", out, "--memory-budget-mb", "0", "--real-limit", "0", "--epochs", "2",
            "--batch-size", "32", "--attack-steps", "1", "--head-hidden", "16", "--dra-weight", "0.5"]
    code, _, err = run_cli(capsys, argv)
    line = assert_one_error_line(code, err)
    assert "changed since training started" in line and "--resume" in line and code == 2
    assert not (out / "metrics.json").exists()  # nothing looks finished
    monkeypatch.setattr(trainer.Trainer, "step", step)
    path.write_bytes(saved)  # restored: the run finishes from what it kept
    m = train.run(replace(cfg, resume=True))
    assert (out / "metrics.json").exists() and m["budget"]["steps"] == 4


def _reseal_views(url: Path, key: str, value: int) -> None:
    """A sender who rewrites one view record (row 5, view 1) and re-records manifest and digest."""
    import hashlib

    from pipeline.cache.store import attrs_digest, open_group

    g = open_group(str(url), "r+")
    arr = g[f"train/{key}"]
    block = arr[...]
    block[5, 1] = value
    arr[...] = block
    root = json.loads((url / "zarr.json").read_text())
    a = root["attributes"]
    for k in list(a["manifest"]):
        if k.startswith(f"train/{key}/"):
            a["manifest"][k] = hashlib.sha256((url / k).read_bytes()).hexdigest()
    a["digest"] = attrs_digest(a)
    (url / "zarr.json").write_text(json.dumps(root))


@pytest.mark.parametrize("key,value", [("dy", 5), ("dx", -1), ("flip", 2)], ids=["dy-2pad+1", "dx-negative", "flip-2"])
def test_view_records_outside_the_view_spec_are_refused(copy, tmp_path, capsys, key, value):
    """Offsets outside [0, 2*pad] (pad 2 here) would crash a step (dy = 5) or train on wrapped crops
    that are not the views the targets belong to (dx = -1): verify names them, train refuses them."""
    from pipeline.cache.store import verify_cache

    _reseal_views(copy, key, value)
    problems = verify_cache(str(copy))
    assert len(problems) == 1 and problems[0].startswith(f"train: view records: {key} values"), problems
    code, _, err = run_cli(capsys, ["train", "--cache", copy, "--out", tmp_path / "run", "--real-limit", "0",
                                    "--epochs", "1", "--no-verify"])
    assert f"view records: {key} values" in assert_one_error_line(code, err)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("spec", [None, {"kind": "pad-crop-flip", "pad": "2", "flip": True, "fill": 0},
                                  {"kind": "rotate", "pad": 2, "flip": True, "fill": 0}], ids=["missing", "pad-a-string", "other-kind"])
def test_a_malformed_view_spec_is_one_line(copy, tmp_path, capsys, spec):
    from pipeline.cache.store import attrs_digest, verify_cache

    root = json.loads((copy / "zarr.json").read_text())
    a = root["attributes"]
    a.pop("view_spec") if spec is None else a.update(view_spec=spec)
    a["digest"] = attrs_digest(a)
    (copy / "zarr.json").write_text(json.dumps(root))
    problems = verify_cache(str(copy))
    assert len(problems) == 1 and "view spec" in problems[0], problems
    code, _, err = run_cli(capsys, ["train", "--cache", copy, "--out", tmp_path / "run", "--real-limit", "0"])
    assert "view spec" in assert_one_error_line(code, err)

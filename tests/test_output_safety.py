"""Outputs are safe: a write interrupted in any stage (prepare, diffusion, generate, extract,
train checkpoints, evaluate, report: a full disk or a kill injected half-way) leaves nothing
that looks complete, and a rerun or resume finishes equal to an uninterrupted run; no stage
deletes or replaces an existing --out or staging folder that it did not make.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from reliability_helpers import TRAIN_ARGS, assert_one_error_line, extract_cfg, run_cli, train_cfg

from pipeline.cache import store as cache_mod
from pipeline.cache.store import open_cache, verify_cache
from pipeline.classifiers import zoo as models_mod
from pipeline.classifiers.zoo import load_classifier
from pipeline.core import members
from pipeline.core.errors import UserError
from pipeline.core.shards import read_split
from pipeline.data.config import PrepareConfig
from pipeline.diffusion.config import DiffusionConfig
from pipeline.diffusion.model import load_model
from pipeline.evaluate.config import AutoAttackVersion, EvaluateConfig
from pipeline.generate import synthesis
from pipeline.generate.config import GenerateConfig
from pipeline.report.config import ReportConfig
from pipeline.report.results import read_log
from stages import diffusion as diffusion_stage
from stages import evaluate, extract, generate, prepare, report, train


class Injected(OSError):
    """The failure we inject (a full disk, say), distinct from anything the code raises itself."""


def test_prepare_interrupted_mid_shard(fmnist_dir, tmp_path, monkeypatch):
    real_encode, calls = members.encode_png, {"n": 0}

    def encode(image):
        calls["n"] += 1
        if calls["n"] == 50:  # inside the second tar shard
            raise Injected("disk full (injected)")
        return real_encode(image)

    monkeypatch.setattr(members, "encode_png", encode)
    out = tmp_path / "real"
    with pytest.raises(Injected):
        prepare.run(PrepareConfig(source=str(fmnist_dir), out=str(out), limit=64, shard_size=32))
    assert not (out / "train").exists()  # the split folder appears only complete
    assert not list(out.rglob("fingerprint.json"))
    with pytest.raises(UserError, match="not a complete shard set"):
        read_split(out / "train")
    monkeypatch.undo()
    prepare.run(PrepareConfig(source=str(fmnist_dir), out=str(out), limit=64, shard_size=32))
    assert read_split(out / "train").fingerprint["count"] == 64
    assert not (out / "train.tmp").exists()


def test_diffusion_pointer_interrupted(model_dir, tmp_path, monkeypatch):
    def boom(tmp, out, **kw):
        raise Injected("killed before the rename (injected)")

    monkeypatch.setattr(diffusion_stage.storage, "commit", boom)
    out = tmp_path / "diffusion"
    with pytest.raises(Injected):
        diffusion_stage.run(DiffusionConfig(pretrained=str(model_dir), out=str(out)))
    assert not out.exists()
    with pytest.raises(UserError):
        load_model(str(out))


def test_generate_interrupted_after_shards(model_dir, fmnist_shards, tmp_path, monkeypatch):
    def boom(*args, **kw):
        raise Injected("killed while drawing the grid (injected)")

    monkeypatch.setattr(synthesis, "save_grid", boom)  # inside `finish`, after the shards
    out = tmp_path / "syn"
    cfg = GenerateConfig(model=str(model_dir), real_train=str(fmnist_shards / "train"), out=str(out), n=4,
                         sample_steps=2, batch_size=4, check=False, bf16=False)
    with pytest.raises(Injected):
        generate.run(cfg)
    assert not out.exists()  # shards were written, but inside OUT.tmp


def test_extract_interrupted_store_is_refused_then_finished(model_dir, fmnist_shards, store, tmp_path,
                                                            monkeypatch, capsys):
    real_write, calls = cache_mod.CacheWriter.write_shard, {"n": 0}

    def write_shard(self, part, s, block):
        calls["n"] += 1
        if calls["n"] == 2:
            raise Injected("killed mid-extract (injected)")
        real_write(self, part, s, block)

    monkeypatch.setattr(cache_mod.CacheWriter, "write_shard", write_shard)
    out = tmp_path / "feats.zarr"
    with pytest.raises(Injected):
        extract.run(extract_cfg(model_dir, fmnist_shards, out))
    assert any("incomplete" in p for p in verify_cache(str(out)))
    code, _, err = run_cli(capsys, ["train", "--cache", out, "--out", tmp_path / "run", *TRAIN_ARGS])
    assert "incomplete" in assert_one_error_line(code, err) and not (tmp_path / "run").exists()
    monkeypatch.undo()
    extract.run(extract_cfg(model_dir, fmnist_shards, out))  # finishes what is missing
    assert verify_cache(str(out)) == []
    a, b = open_cache(str(out)).part("train"), open_cache(str(store)).part("train")
    np.testing.assert_array_equal(a.read_chunk(0), b.read_chunk(0))


def _partial_save_file(fail_at: int):
    """A safetensors writer that dies on its ``fail_at``-th call, half-way through the file."""
    real, calls = models_mod.save_file, {"n": 0}

    def save_file(tensors, path, metadata=None):
        calls["n"] += 1
        real(tensors, path, metadata=metadata)
        if calls["n"] == fail_at:
            data = Path(path).read_bytes()
            Path(path).write_bytes(data[: len(data) // 2])
            raise Injected(f"disk full while writing {Path(path).name} (injected)")

    return save_file


def _loadable(folder: Path) -> None:
    from safetensors.torch import load_file

    for f in folder.glob("*.safetensors"):
        load_file(str(f))  # every file under its final name is whole


@pytest.fixture(scope="module")
def two_epochs(store, tmp_path_factory) -> tuple[dict, Path]:
    """An uninterrupted 2-epoch run: what every interrupted-then-resumed run must end equal to."""
    out = tmp_path_factory.mktemp("rel-full") / "run"
    return train.run(train_cfg(store, out, epochs=2)), out


# each save writes two safetensors files (model, then the state that commits it); fail_at is the
# write that dies: 1 = the very first, 4 = epoch 2's last (one whole checkpoint on disk). With the
# state written first, 4 used to resume into "done" and finish with epoch 1's model and log.
@pytest.mark.parametrize("fail_at", [1, 4, pytest.param(2, marks=pytest.mark.slow),
                                     pytest.param(3, marks=pytest.mark.slow)])
def test_train_checkpoint_interrupted_then_resumed(store, two_epochs, tmp_path, monkeypatch, fail_at):
    out = tmp_path / "run"
    cfg = train_cfg(store, out, epochs=2)
    monkeypatch.setattr(models_mod, "save_file", _partial_save_file(fail_at))
    with pytest.raises(Injected):
        train.run(cfg)
    monkeypatch.undo()
    assert not (out / "metrics.json").exists()
    _loadable(out)
    if fail_at == 1:
        assert not (out / "config.json").exists() and not (out / "model.safetensors").exists()
    else:
        assert json.loads((out / "config.json").read_text())["finished"] is False
        load_classifier(out)
    metrics = train.run(replace(cfg, resume=True))
    full, full_dir = two_epochs
    assert metrics["loss"] == full["loss"] and metrics["epochs"] == 2
    assert json.loads((out / "config.json").read_text())["finished"] is True
    a, b = load_classifier(out)[0].state_dict(), load_classifier(full_dir)[0].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)  # the final model is the one the finished run made
    got, want = read_log(out / "log.tsv"), read_log(full_dir / "log.tsv")
    assert len(got["epoch"]) == 2 and {k: v for k, v in got.items() if k != "step_time_s"} == \
        {k: v for k, v in want.items() if k != "step_time_s"}


def _write_text_dies_on(suffix: str, monkeypatch) -> None:
    """Kill the write of the temporary file of ``NAME`` (``NAME.tmp``, or atomic_write's
    ``.NAME.XXXXXXXX.tmp``) half way through."""
    name = suffix.removesuffix(".tmp")

    def dying(real):
        def write(self, data, *args, **kw):
            if self.name.endswith(suffix) or (self.name.startswith(f".{name}.") and self.name.endswith(".tmp")):
                real(self, data[: len(data) // 2], *args, **kw)
                raise Injected(f"killed while writing {self.name} (injected)")
            return real(self, data, *args, **kw)
        return write

    monkeypatch.setattr(Path, "write_text", dying(Path.write_text))
    monkeypatch.setattr(Path, "write_bytes", dying(Path.write_bytes))


def test_evaluate_json_interrupted(checkpoint, fmnist_shards, tmp_path, monkeypatch):
    cfg = EvaluateConfig(checkpoint=str(checkpoint), shards=str(fmnist_shards / "test"),
                         out=str(tmp_path / "eval" / "at.json"), n=8, pgd_steps=1, pgd_restarts=1,
                         autoattack=AutoAttackVersion.none, check_n=8, batch_size=8)
    _write_text_dies_on("at.json.tmp", monkeypatch)
    with pytest.raises(Injected):
        evaluate.run(cfg)
    assert not (tmp_path / "eval" / "at.json").exists()
    assert not (tmp_path / "eval" / "at.metrics.json").exists()
    monkeypatch.undo()
    _write_text_dies_on("at.metrics.json.tmp", monkeypatch)
    with pytest.raises(Injected):
        evaluate.run(cfg)
    assert not (tmp_path / "eval" / "at.metrics.json").exists()
    json.loads((tmp_path / "eval" / "at.json").read_text())  # whatever exists is whole JSON


def test_report_interrupted(tmp_path, monkeypatch):
    evals = tmp_path / "eval"
    evals.mkdir()
    result = {"variant": "AT", "clean": 0.5, "pgd": 0.25, "autoattack": None, "n": 8, "eps": 0.1,
              "attacks": ["pgd"], "pgd_attack": {"steps": 1, "restarts": 1}, "autoattack_version": "none",
              "warnings": [], "train_config": {}}
    (evals / "at.json").write_text(json.dumps(result))
    _write_text_dies_on("summary.json", monkeypatch)
    out = tmp_path / "report"
    with pytest.raises(Injected):
        report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(out)))
    assert not out.exists()


def _foreign(folder: Path) -> Path:
    """A folder of someone else's: a file the stage never writes."""
    folder.mkdir(parents=True)
    (folder / "thesis.tex").write_text("years of work\n")
    return folder


def test_no_stage_deletes_a_folder_it_did_not_make(model_dir, fmnist_dir, fmnist_shards, tmp_path):
    """generate, diffusion, prepare and report given an existing foreign --out refuse before any work
    and leave it as it was; their own earlier output (signature file) and an interrupted run's
    staging folder (.staging marker) are still replaced."""
    cases = {
        "diffusion": (lambda out: diffusion_stage.run(DiffusionConfig(pretrained=str(model_dir), out=str(out)))),
        "generate": (lambda out: generate.run(GenerateConfig(model=str(model_dir), real_train=str(fmnist_shards / "train"),
                                                             out=str(out), n=4, sample_steps=2, batch_size=4,
                                                             check=False, bf16=False))),
        "prepare": (lambda out: prepare.run(PrepareConfig(source=str(fmnist_dir), out=str(out), limit=8))),
    }
    for name, run in cases.items():
        out = tmp_path / name
        victim = _foreign(out / "train" if name == "prepare" else out)
        with pytest.raises(UserError, match="not an output of this stage"):
            run(out)
        assert sorted(p.name for p in victim.iterdir()) == ["thesis.tex"], name
        shutil.rmtree(out)
        staging = out / "train.tmp" if name == "prepare" else Path(f"{out}.tmp")
        _foreign(staging)  # a folder named like our staging folder, without our marker
        with pytest.raises(UserError, match="was not left by this stage"):
            run(out)
        assert sorted(p.name for p in staging.iterdir()) == ["thesis.tex"], name
        shutil.rmtree(staging)
        run(out)  # a fresh output ...
        run(out)  # ... which the stage may replace: it is its own
    _foreign(tmp_path / "d2.ckpt")  # diffusion removes OUT.ckpt after training: refused up front
    with pytest.raises(UserError, match="step-"):
        diffusion_stage.run(DiffusionConfig(shards=str(fmnist_shards / "train"), out=str(tmp_path / "d2"), steps=1))
    assert (tmp_path / "d2.ckpt" / "thesis.tex").exists() and not (tmp_path / "d2").exists()
    report_out = _foreign(tmp_path / "report")
    evals = tmp_path / "evals"
    evals.mkdir()
    (evals / "at.json").write_text(json.dumps({"variant": "AT", "clean": 0.5, "pgd": 0.25, "n": 8}))
    with pytest.raises(UserError, match="not an output of this stage"):
        report.run(ReportConfig(evals=str(evals), train="", grid="", out=str(report_out)))
    assert sorted(p.name for p in report_out.iterdir()) == ["thesis.tex"]


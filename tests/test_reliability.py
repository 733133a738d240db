"""Reliability and security across the stages: damaged caches, bad input at the CLI, code that
could run from a loaded file, keys that could escape a folder, and interrupted writes.

Everything runs on a tiny UNet and a few dozen real Fashion-MNIST images; each refusal is
checked through ``pipeline.cli.main`` (one ``error:`` line, exit != 0, no traceback) and each
interruption by injecting a failure in the middle of a write, then looking at what is left.
"""

from __future__ import annotations

import ast
import hashlib
import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import cache as cache_mod
from pipeline import models as models_mod
from pipeline import shards as shards_mod
from pipeline import trainer
from pipeline.cache import open_cache, verify_cache
from pipeline.cli import main
from pipeline.config import (
    AutoAttackVersion,
    DiffusionConfig,
    EvaluateConfig,
    ExtractConfig,
    GenerateConfig,
    PrepareConfig,
    ReportConfig,
    TrainConfig,
)
from pipeline.diffusion import load_model
from pipeline.errors import UserError
from pipeline.models import build_classifier, load_classifier, save_checkpoint
from pipeline.results import read_log
from pipeline.shards import check_key, read_split, write_split
from pipeline.sources import Split
from stages import diffusion as diffusion_stage
from stages import evaluate, extract, generate, prepare, report, train

ROOT = Path(__file__).resolve().parents[1]


# --- fixtures: a tiny model, a small complete store, a trained checkpoint -------------------------
@pytest.fixture(scope="module")
def model_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def extract_cfg(model_dir: Path, real: Path, out: Path, **kw) -> ExtractConfig:
    base = ExtractConfig(model=str(model_dir), real=str(real), synthetic="", out=str(out), views=2,
                         batch_size=128, rows_per_chunk=16, chunks_per_shard=2, limit=64)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir, fmnist_shards) -> Path:
    """A complete cache: train part 64 x 2 views in 2 zarr shards of 32 rows, test part 64 x 1."""
    out = tmp_path_factory.mktemp("rel-cache") / "feats.zarr"
    extract.run(extract_cfg(model_dir, fmnist_shards, out))
    return out


TRAIN_ARGS = ["--real-limit", "0", "--epochs", "1", "--batch-size", "32", "--attack-steps", "1",
              "--head-hidden", "16"]


def train_cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = TrainConfig(cache=str(store), out=str(out), real_limit=0, epochs=1, batch_size=32, attack_steps=1,
                       head_hidden=16, ema_decay=0.9)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, store) -> Path:
    out = tmp_path_factory.mktemp("rel-ckpt") / "at"
    train.run(train_cfg(store, out))
    return out


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process CLI call; any exception that escapes fails."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def assert_one_error_line(code: int, err: str) -> str:
    """Exit != 0, no traceback, exactly one ``error:`` line and it is the last one (progress bars
    of work already started may precede it). Returns that line."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


# --- 1. damaged caches: `cache verify` names the problem, `train` refuses before training ---------
def _feature_file(url: Path, part: str = "train", array: str = "features") -> Path:
    attrs = json.loads((url / "zarr.json").read_text())["attributes"]
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
    group = cache_mod._open_group(str(url), "r+")
    feats = group["train"]["features"]
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


def _no_training(*args, **kw):
    raise AssertionError("training started on a store that should have been refused")


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_train_refuses_damaged_store(store, tmp_path, capsys, monkeypatch, damage):
    fn, words = DAMAGE[damage]
    monkeypatch.setattr(trainer, "build", _no_training)  # refused before the model is even built
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
    monkeypatch.setattr(trainer, "build", _no_training)
    code, _, err = run_cli(capsys, ["train", "--cache", other, "--out", tmp_path / "run", *TRAIN_ARGS])
    assert "normalisation" in assert_one_error_line(code, err) and not (tmp_path / "run").exists()


def test_damage_in_an_unused_part_does_not_block_training(store, tmp_path):
    """train checks what it reads: a damaged test part (the probe's) is not its business."""
    bad = tmp_path / "bad.zarr"
    shutil.copytree(store, bad)
    path = _feature_file(bad, part="test")
    path.write_bytes(path.read_bytes()[:-10])
    assert any("test/features" in p for p in verify_cache(str(bad)))
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


# --- 2. bad input across the CLI ------------------------------------------------------------------
def _corrupt_member(split: Path) -> None:
    """Replace the PNG of sample 3 by junk and re-record the shard's sha256 (a well-formed tar
    whose checksums match, with one undecodable member)."""
    shard = split / "shard-000000.tar"
    with tarfile.open(shard) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
    with tarfile.open(shard, "w") as tar:
        for m, data in members:
            if m.name.endswith("0000003.png"):
                data = b"\x89PNG junk"
                m.size = len(data)
            tar.addfile(m, io.BytesIO(data))
    fp = json.loads((split / "fingerprint.json").read_text())
    fp["shards"][0]["sha256"] = hashlib.sha256(shard.read_bytes()).hexdigest()
    (split / "fingerprint.json").write_text(json.dumps(fp))


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory, fmnist_shards) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("rel-bad")
    text = root / "notes.txt"
    text.write_text("not a dataset, not a model, not a store\n")
    badtar = root / "badtar"
    shutil.copytree(fmnist_shards, badtar)
    _corrupt_member(badtar / "train")
    trunc = root / "trunc"
    shutil.copytree(fmnist_shards, trunc)
    shard = trunc / "train" / "shard-000000.tar"
    shard.write_bytes(shard.read_bytes()[:5000])
    return {"text": text, "badtar": badtar, "trunc": trunc, "nope": root / "does-not-exist"}


# id -> argv template; {out} is a fresh folder that must not exist afterwards, {text} a text file
CASES = {
    "prepare/missing-source": "prepare --source {nope} --out {out}/s",
    "prepare/text-as-source": "prepare --source {text} --out {out}/s",
    "prepare/shard-size-0": "prepare --source {fmnist} --shard-size 0 --limit 8 --out {out}/s",
    "prepare/negative-limit": "prepare --limit -5 --out {out}/s",
    "prepare/out-is-a-file": "prepare --source {fmnist} --limit 8 --out {text}",
    "diffusion/text-as-shards": "diffusion --shards {text} --out {out}/m",
    "diffusion/batch-size-0": "diffusion --batch-size 0 --out {out}/m",
    "diffusion/text-as-model": "diffusion --model {text} --out {out}/m",
    "diffusion/shards-as-model": "diffusion --model {real}/train --out {out}/m",
    "diffusion/corrupted-tar-member": "diffusion --shards {badtar}/train --steps 1 --out {out}/m",
    "generate/negative-n": "generate --model {model} --n -5 --out {out}/g",
    "generate/guidance-nan": "generate --model {model} --guidance nan --no-check --out {out}/g",
    "generate/text-as-model": "generate --model {text} --out {out}/g",
    "generate/absurd-steps": "generate --model {model} --sample-steps 100000 --no-check --out {out}/g",
    "extract/t-negative": "extract --model {model} --real {real} --synthetic '' --t -1 --out {out}/f.zarr",
    "extract/t-outside-schedule": "extract --model {model} --real {real} --synthetic '' --t 100000 --out {out}/f.zarr",
    "extract/views-0": "extract --model {model} --real {real} --synthetic '' --views 0 --out {out}/f.zarr",
    "extract/batch-size-negative": "extract --model {model} --real {real} --synthetic '' --batch-size -1 --out {out}/f.zarr",
    "extract/unknown-layer": "extract --model {model} --real {real} --synthetic '' --layer nope --out {out}/f.zarr",
    "extract/text-as-shards": "extract --model {model} --real {text} --synthetic '' --out {out}/f.zarr",
    "extract/corrupted-tar-member": "extract --model {model} --real {badtar} --synthetic '' --limit 64 --out {out}/f.zarr",
    "extract/truncated-tar": "extract --model {model} --real {trunc} --synthetic '' --limit 64 --out {out}/f.zarr",
    "extract/view-pad-overflows-int8": "extract --model {model} --real {real} --synthetic '' --view-pad 64 --out {out}/f.zarr",
    "extract/out-is-a-file": "extract --model {model} --real {real} --synthetic '' --limit 16 --out {text}",
    "train/missing-cache": "train --cache {nope} --out {out}/t",
    "train/text-as-cache": "train --cache {text} --out {out}/t",
    "train/shards-as-cache": "train --cache {real} --out {out}/t",
    "train/batch-size-0": "train --cache {store} --batch-size 0 --out {out}/t",
    "train/batch-size-negative": "train --cache {store} --batch-size -1 --out {out}/t",
    "train/eps-negative": "train --cache {store} --eps -0.1 --out {out}/t",
    "train/view-pad-overflows-int8": "train --cache {store} --view-pad 64 --out {out}/t",
    "train/lr-inf": "train --cache {store} --lr inf --out {out}/t",
    "train/dra-weight-inf": "train --cache {store} --dra-weight inf --out {out}/t",
    "train/trades-beta-nan": "train --cache {store} --method trades --trades-beta nan --out {out}/t",
    "train/weight-decay-nan": "train --cache {store} --weight-decay nan --out {out}/t",
    "train/momentum-1": "train --cache {store} --momentum 1 --out {out}/t",
    "train/corrupted-tar-member": "train --cache {store} --real-shards {badtar}/train --out {out}/t",
    "train/out-is-a-file": "train --cache {store} --real-limit 0 --epochs 1 --batch-size 32 --out {text}",
    "evaluate/text-as-checkpoint": "evaluate --checkpoint {text} --shards {real}/test --out {out}/e.json",
    "evaluate/store-as-checkpoint": "evaluate --checkpoint {store} --shards {real}/test --out {out}/e.json",
    "evaluate/negative-n": "evaluate --checkpoint {ckpt} --shards {real}/test --n -5 --out {out}/e.json",
    "evaluate/eps-negative": "evaluate --checkpoint {ckpt} --shards {real}/test --eps -0.1 --out {out}/e.json",
    "evaluate/pgd-step-size-nan": "evaluate --checkpoint {ckpt} --shards {real}/test --pgd-step-size nan --out {out}/e.json",
    "diffusion/lr-nan": "diffusion --lr nan --out {out}/m",
    "evaluate/corrupted-tar-member": ("evaluate --checkpoint {ckpt} --shards {badtar}/train --n 8 "
                                      "--autoattack none --out {out}/e.json"),
    "evaluate/out-is-a-folder": "evaluate --checkpoint {ckpt} --shards {real}/test --out {real}",
    "report/missing-evals": "report --evals {nope} --out {out}/r",
    "cache-info/text": "cache info {text}",
    "cache-verify/missing": "cache verify {nope}",
    "bench/n-0": "bench --n 0 --out {out}/b.json",
    "cli/not-an-integer": "train --batch-size abc --out {out}/t",
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_one_line_and_no_output(case, bad_inputs, fmnist_dir, fmnist_shards, model_dir, store,
                                          checkpoint, tmp_path, capsys):
    import shlex

    out = tmp_path / "out"
    paths = {**bad_inputs, "fmnist": fmnist_dir, "real": fmnist_shards, "model": model_dir, "store": store, "ckpt": checkpoint,
             "out": out}
    before = {p: p.read_bytes() for p in [bad_inputs["text"]]}
    real_listing = sorted(p.name for p in (fmnist_shards).rglob("*"))
    argv = shlex.split(CASES[case].format(**paths))
    code, _, err = run_cli(capsys, argv)
    assert_one_error_line(code, err)
    assert not out.exists(), sorted(out.rglob("*"))  # no partial output at all
    assert {p: p.read_bytes() for p in before} == before  # an input given as --out is untouched
    assert sorted(p.name for p in fmnist_shards.rglob("*")) == real_listing


def test_prepare_refuses_bad_sizes_before_reading(tmp_path, monkeypatch):
    monkeypatch.setattr(prepare, "read_source", _no_training)
    a_file = tmp_path / "f"
    a_file.write_text("x")
    for kw in ({"shard_size": 0}, {"shard_size": -3}, {"limit": -1}, {"out": str(a_file)}):
        with pytest.raises(UserError):
            prepare.run(PrepareConfig(**{"out": str(tmp_path / "o"), **kw}))
    assert not (tmp_path / "o").exists()


def test_bad_input_in_a_real_process(model_dir, fmnist_shards, tmp_path):
    """One extract refusal through `python -m pipeline`: the stderr a user sees is one line."""
    proc = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--model", str(model_dir),
                           "--real", str(fmnist_shards), "--synthetic", "", "--t", "5000",
                           "--out", str(tmp_path / "f.zarr")], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and proc.stderr.startswith("error: timestep t=5000"), proc.stderr
    assert not (tmp_path / "f.zarr").exists()


# --- 3. security: nothing loaded runs code, keys cannot escape ------------------------------------
# the one documented exception: CIFAR's python batches are pickles, read by an unpickler that
# admits numpy arrays only (pipeline/sources.py; tests/test_prepare.py::test_cifar_pickle_cannot_run_code)
RESTRICTED_UNPICKLERS = {("pipeline/sources.py", "_NumpyOnlyUnpickler")}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _kw(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_loads(source: str, filename: str) -> list[str]:
    """Calls that can run code from a file: pickle and friends, torch.load without
    weights_only=True, np.load(allow_pickle=True), eval/exec, yaml.load without a safe loader,
    trust_remote_code=True. Restricted unpicklers must override find_class and be listed."""
    found = []
    for node in ast.walk(ast.parse(source)):
        where = f"{filename}:{getattr(node, 'lineno', '?')}"
        if isinstance(node, ast.ClassDef):
            bases = {_dotted(b) for b in node.bases}
            if bases & {"pickle.Unpickler", "Unpickler", "_pickle.Unpickler"}:
                overrides = any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in node.body)
                if (filename, node.name) not in RESTRICTED_UNPICKLERS or not overrides:
                    found.append(f"{where}: unpickler {node.name}")
        if not isinstance(node, ast.Call):
            continue
        name = _dotted(node.func)
        if name in {"pickle.load", "pickle.loads", "pickle.Unpickler", "_pickle.loads", "cPickle.loads",
                    "dill.load", "dill.loads", "joblib.load", "marshal.load", "marshal.loads", "shelve.open",
                    "yaml.unsafe_load", "yaml.full_load", "torch.jit.load", "eval", "exec"}:
            found.append(f"{where}: {name}")
        elif name == "torch.load" and not _true(_kw(node, "weights_only")):
            found.append(f"{where}: torch.load without weights_only=True")
        elif name in {"np.load", "numpy.load"} and _true(_kw(node, "allow_pickle")):
            found.append(f"{where}: {name}(allow_pickle=True)")
        elif name == "yaml.load" and "Safe" not in _dotted(_kw(node, "Loader") or ast.Name("")):
            found.append(f"{where}: yaml.load without SafeLoader")
        if _true(_kw(node, "trust_remote_code")):
            found.append(f"{where}: trust_remote_code=True")
    return found


def test_scanner_catches_each_unsafe_pattern():
    bad = """
import pickle, torch, numpy as np, yaml
pickle.loads(b"")
torch.load("x")
torch.load("x", weights_only=False)
np.load("x", allow_pickle=True)
eval("1")
exec("1")
yaml.load(s)
yaml.load(s, Loader=yaml.Loader)
M.from_pretrained("x", trust_remote_code=True)
class U(pickle.Unpickler):
    pass
"""
    assert len(unsafe_loads(bad, "pipeline/x.py")) == 10
    ok = """
import torch, numpy as np, yaml
torch.load("x", weights_only=True)
np.load("x", allow_pickle=False)
yaml.load(s, Loader=yaml.SafeLoader)
yaml.safe_load(s)
model.eval()
"""
    assert unsafe_loads(ok, "pipeline/x.py") == []


def test_no_code_runs_from_loaded_files_in_the_source():
    files = sorted([*ROOT.glob("pipeline/*.py"), *ROOT.glob("stages/*.py")])
    assert len(files) > 10
    found = [f for p in files for f in unsafe_loads(p.read_text(), str(p.relative_to(ROOT)))]
    assert found == [], found


class _Evil:
    """Pickles to a call of os.mkdir(marker): loading it with plain pickle creates the folder."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _evil_file(path: Path, marker: Path) -> None:
    probe = path.with_name("probe.pt")
    torch.save({"weight": _Evil(marker)}, probe)
    # the file really is dangerous: an unrestricted load runs the call (then we undo it)
    torch.load(probe, weights_only=False)
    assert marker.is_dir()
    marker.rmdir()
    probe.rename(path)


def test_checkpoint_folder_pickles_are_ignored_or_refused(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "ckpt"
    save_checkpoint(folder, build_classifier("cnn", 1, 10, 28),
                    {"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 28})
    for name in ("model.pt", "pytorch_model.bin", "state.pt", "optimizer.pt"):
        _evil_file(folder / name, marker)
    load_classifier(folder)  # pickles beside the safetensors weights are never opened
    assert not marker.exists()
    _evil_file(folder / "model.safetensors", marker)  # a pickle under the weights' name
    with pytest.raises(UserError, match="cannot load checkpoint"):
        load_classifier(folder)
    assert not marker.exists()


def test_resume_state_that_is_a_pickle_is_refused(store, tmp_path):
    marker = tmp_path / "pwned"
    out = tmp_path / "run"
    out.mkdir()
    _evil_file(out / "state.safetensors", marker)
    with pytest.raises(UserError, match="unreadable checkpoint"):
        train.run(train_cfg(store, out, resume=True))
    assert not marker.exists()


def test_diffusion_model_folder_pickles_do_not_run(model_dir, tmp_path):
    marker = tmp_path / "pwned"
    # a pickle beside our safetensors weights: ignored
    beside = tmp_path / "beside"
    shutil.copytree(model_dir, beside)
    _evil_file(beside / "unet" / "diffusion_pytorch_model.bin", marker)
    load_model(str(beside))
    assert not marker.exists()
    # pickle-only weights (the old diffusers .bin layout): torch.load(weights_only=True) refuses
    only = tmp_path / "only"
    shutil.copytree(model_dir, only)
    (only / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (only / "model_info.json").unlink()  # no recorded sha256 to trip over first
    _evil_file(only / "unet" / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(UserError):
        load_model(str(only))
    assert not marker.exists()


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
    png = shards_mod.encode_png(np.zeros((4, 4, 1), np.uint8))
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


# --- 4. interrupted writes leave nothing that looks complete --------------------------------------
class Injected(OSError):
    """The failure we inject (a full disk, say), distinct from anything the code raises itself."""


def test_prepare_interrupted_mid_shard(fmnist_dir, tmp_path, monkeypatch):
    real_encode, calls = shards_mod.encode_png, {"n": 0}

    def encode(image):
        calls["n"] += 1
        if calls["n"] == 50:  # inside the second tar shard
            raise Injected("disk full (injected)")
        return real_encode(image)

    monkeypatch.setattr(shards_mod, "encode_png", encode)
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
        diffusion_stage.run(DiffusionConfig(model=str(model_dir), out=str(out)))
    assert not out.exists()
    with pytest.raises(UserError):
        load_model(str(out))


def test_generate_interrupted_after_shards(model_dir, fmnist_shards, tmp_path, monkeypatch):
    def boom(*args, **kw):
        raise Injected("killed while drawing the grid (injected)")

    monkeypatch.setattr(generate, "save_grid", boom)
    out = tmp_path / "syn"
    cfg = GenerateConfig(model=str(model_dir), real=str(fmnist_shards / "train"), out=str(out), n=4,
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
    real = Path.write_text

    def write_text(self, data, *args, **kw):
        if self.name.endswith(suffix):
            real(self, data[: len(data) // 2], *args, **kw)
            raise Injected(f"killed while writing {self.name} (injected)")
        return real(self, data, *args, **kw)

    monkeypatch.setattr(Path, "write_text", write_text)


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
        "diffusion": (lambda out: diffusion_stage.run(DiffusionConfig(model=str(model_dir), out=str(out)))),
        "generate": (lambda out: generate.run(GenerateConfig(model=str(model_dir), real=str(fmnist_shards / "train"),
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


def _foreign_split(folder: Path, keys: list[str], images: np.ndarray, labels: np.ndarray, *,
                   classes: int = 10, shard_size: int = 4) -> Path:
    """Shards written the way a stranger could: any keys, labels and names, a consistent fingerprint."""
    from pipeline.shards import content_hash, finish_split, make_fingerprint, write_shard

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
    from pipeline.shards import read_split, shards_digest

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

    from pipeline.shards import read_split

    split = tmp_path / "train"
    shutil.copytree(fmnist_shards / "train", split)
    (split / "shard-000000.tar").unlink()
    os.symlink("/dev/zero", split / "shard-000000.tar")
    with pytest.raises(UserError, match="not a regular file"):
        read_split(split)


def test_model_pointer_loop_and_checkpoint_config_not_an_object(tmp_path, checkpoint):
    from pipeline.models import load_classifier

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

    from pipeline.shards import read_split, shards_digest, write_shard

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

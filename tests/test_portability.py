"""A second team that receives a store and nothing else: the store alone (copied to another folder,
or to an S3 bucket) verifies against its digest, trains and evaluates; settings come from the
artifacts (view padding from the cache, eps from the checkpoint, `8/255` as a flag value); the
Python API (pipeline/api.py) gives the same (image, target) pairs as `train`, and its example runs.

The team is a fresh process in an empty working folder: nothing of the producing team's is there
but the store (and the test shards evaluate reads).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from reliability_helpers import TRAIN_ARGS, assert_one_error_line, extract_cfg, run_cli, train_cfg

from pipeline import api
from pipeline.cache.store import CacheWriter, open_cache, record_path, resolve_path
from pipeline.core.config import parse_float
from pipeline.core.errors import UserError
from pipeline.core.views import ViewRequest
from pipeline.evaluate.inputs import attack_budget
from pipeline.train import trainer
from pipeline.train.data import assemble
from pipeline.train.runtime import Runtime
from pipeline.train.sampler import Batch, MixedSampler
from stages import extract

ROOT = Path(__file__).resolve().parents[1]

# The README's example (pipeline/api.py's docstring holds it too): run as it is, paths replaced.
EXAMPLE = '''\
from pipeline import api
store = api.open_store("feats.zarr")              # every file checked against the manifest
loader = api.dataloader(store, batch_size=64)     # (view images, labels, targets), streamed past RAM
x, y, target = next(iter(loader))                 # x: (64, C, H, W) in [0, 1]; target: (64, *shape)
model, head, config = api.load_classifier("artifacts/train/at_dra")  # EMA classifier + DRA head
'''


def team(cwd: Path, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """`python -m pipeline ARGS` in a fresh process whose working folder is ``cwd``."""
    return subprocess.run([sys.executable, "-m", "pipeline", *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, **(env or {}), "PYTHONPATH": str(ROOT)})


@pytest.fixture(scope="module")
def received(store, tmp_path_factory) -> Path:
    """The session store, copied alone into another folder: the split and the model it names
    (recorded relative to the store) are not beside the copy."""
    out = tmp_path_factory.mktemp("team-b") / "received" / "feats.zarr"
    shutil.copytree(store, out)
    return out


def test_a_store_copied_alone_verifies_trains_and_evaluates(store, received, fmnist_shards, tmp_path):
    digest = open_cache(str(store)).attrs["digest"]
    work = tmp_path / "work"
    work.mkdir()
    proc = team(work, "cache", "verify", received, "--digest", digest)
    assert proc.returncode == 0 and proc.stdout.strip().endswith(": ok"), proc.stderr[-2000:]
    proc = team(work, "train", "--cache", received, "--out", work / "run", *TRAIN_ARGS)
    assert proc.returncode == 0, proc.stderr[-2000:]
    notes = [ln for ln in proc.stdout.splitlines() if ln.startswith("note:")]
    assert len(notes) == 1 and "not reachable" in notes[0] and digest[:16] in notes[0], proc.stdout
    assert "cache verify --digest" in notes[0] and "--real-shards" in notes[0]
    ckpt = json.loads((work / "run" / "config.json").read_text())
    assert ckpt["cache"]["digest"] == digest and ckpt["cache"]["image_check"] == {"train": "store"}
    assert ckpt["view_spec"]["pad"] == 2 and ckpt["eps"] == 0.1 and ckpt["threat_model"] == "Linf"
    # evaluate: no --eps, the checkpoint's training eps; the JSON says where it came from
    proc = team(work, "evaluate", "--checkpoint", work / "run", "--shards", fmnist_shards / "test", "--out",
                work / "eval.json", "--n", "32", "--pgd-steps", "2", "--pgd-restarts", "1", "--autoattack", "none",
                "--check-n", "16", "--batch-size", "32")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((work / "eval.json").read_text())
    assert (res["eps"], res["eps_source"], res["threat_model"]) == (0.1, "checkpoint", "Linf")
    assert "eps=0.1 from checkpoint" in proc.stdout
    assert sorted(p.name for p in work.iterdir()) == ["eval.json", "eval.metrics.json", "run"]


def test_the_split_is_checked_where_it_is_reachable(store, received, fmnist_shards, tmp_path, capsys):
    """In place (the split beside the store, where the store records it) or named with
    --real-shards, the stored images are checked against the split: no note."""
    rt = Runtime("cpu")
    for cache, shards in ((store, ""), (received, str(fmnist_shards / "train"))):
        data = trainer.open_data(train_cfg(cache, tmp_path / "x", real_shards=shards), rt)
        assert data.real.image_check == "split" and "note:" not in capsys.readouterr().out
    assert open_cache(str(store)).part("train").shards == os.path.normpath(fmnist_shards / "train")
    # a split named on the command line must be there (the advice names the flag, not `prepare`)
    code, _, err = run_cli(capsys, ["train", "--cache", received, "--out", tmp_path / "o", "--real-shards",
                                    tmp_path / "nowhere", *TRAIN_ARGS])
    line = assert_one_error_line(code, err)
    assert "--real-shards" in line and "prepare" not in line and not (tmp_path / "o").exists()


def test_a_part_without_stored_images_names_the_flag_that_fixes_it(tiny_model_dir, fmnist_shards, tmp_path, capsys):
    plain = tmp_path / "made" / "plain.zarr"
    extract.run(extract_cfg(tiny_model_dir, fmnist_shards, plain, images=False, limit=32))
    beside = tmp_path / "beside" / "plain.zarr"  # as far from the split as before: found, relative to the store
    shutil.copytree(plain, beside)
    assert trainer.open_data(train_cfg(beside, tmp_path / "x"), Runtime("cpu")).real.image_check == "shards"
    moved = tmp_path / "moved" / "elsewhere" / "plain.zarr"
    shutil.copytree(plain, moved)
    code, _, err = run_cli(capsys, ["train", "--cache", moved, "--out", tmp_path / "o", *TRAIN_ARGS])
    line = assert_one_error_line(code, err)
    assert "stores no images" in line and "--real-shards" in line and "prepare" not in line, line
    data = trainer.open_data(train_cfg(moved, tmp_path / "x", real_shards=str(fmnist_shards / "train")),
                             Runtime("cpu"))
    assert data.real.image_check == "shards"


def test_paths_are_recorded_relative_to_the_store_and_old_stores_read_as_before(store, tmp_path):
    assert record_path("a/feats.zarr", "a/shards/real/train") == "../shards/real/train"
    assert record_path("s3://b/x/feats.zarr", "s3://b/x/real/train") == "../real/train"
    assert record_path("s3://b/x/feats.zarr", "s3://other/real") == "s3://other/real"  # another bucket
    assert record_path("s3://b/x/feats.zarr", "rel/model") == os.path.abspath("rel/model")  # another fs
    assert resolve_path("s3://b/x/feats.zarr", "../real/train", True) == "s3://b/x/real/train"
    assert resolve_path("/m/feats.zarr", "../real/train", True) == "/m/real/train"
    assert resolve_path("/m/feats.zarr", "google/ddpm-cifar10-32", True) == "google/ddpm-cifar10-32"  # a hub id
    # a format-3 store from before `paths` (resealed without it): paths read as recorded, from the
    # working folder, as they always were
    old = tmp_path / "old.zarr"
    shutil.copytree(store, old)
    group = zarr.open_group(str(old), mode="r+")
    attrs = {k: v for k, v in group.attrs.items() if k not in ("paths", "complete", "digest")}
    group.attrs.clear()
    group.attrs.update(attrs)
    group["train"].attrs["shards"] = "artifacts/shards/real/train"
    CacheWriter(str(old), group, 0).finalize({})
    cache = open_cache(str(old))
    assert "paths" not in cache.attrs and cache.part("train").shards == "artifacts/shards/real/train"


def test_settings_come_from_the_artifacts(store, tmp_path, capsys):
    """A pad-4 cache trains without --view-pad (a given value must match); evaluate's eps is the
    checkpoint's unless --eps; every float flag takes a fraction."""
    pad4 = tmp_path / "pad4.zarr"
    shutil.copytree(store, pad4)
    group = zarr.open_group(str(pad4), mode="r+")
    group.attrs["view_spec"] = {**group.attrs["view_spec"], "pad": 4}  # offsets 0..4 of pad 2 fit in 0..8
    CacheWriter(str(pad4), group, 0).finalize({})
    rt = Runtime("cpu")
    data = trainer.open_data(train_cfg(pad4, tmp_path / "x"), rt)
    assert data.pad == 4 and data.view.pad == 4
    assert trainer.open_data(train_cfg(pad4, tmp_path / "x", view=ViewRequest(pad=4, flip=True)), rt).pad == 4
    with pytest.raises(UserError, match="augmentation spec"):
        trainer.open_data(train_cfg(pad4, tmp_path / "x", view=ViewRequest(pad=2)), rt)
    # fractions
    assert parse_float("8/255") == 8 / 255 and parse_float("0.5") == 0.5 and parse_float(0.25) == 0.25
    for bad in ("8/0", "a/b", "1/2/3", ""):
        with pytest.raises(ValueError, match="not a number or a fraction"):
            parse_float(bad)
    code, _, err = run_cli(capsys, ["evaluate", "--checkpoint", tmp_path / "none", "--eps", "8/zero"])
    assert "Invalid value for '--eps': '8/zero' is not a number or a fraction a/b" in assert_one_error_line(code, err)
    from pipeline.cli import build_config, config_class  # the values a flag turns into
    from pipeline.evaluate.config import EvaluateConfig

    assert build_config(config_class("evaluate"), {"eps": parse_float("8/255")}).eps == 8 / 255
    assert EvaluateConfig().eps == 0  # 0: the checkpoint's
    # eps: --eps wins; else the checkpoint's (an old one: train.eps); none recorded: one line
    assert attack_budget(8 / 255, {"eps": 0.1}, "c") == (8 / 255, "--eps")
    assert attack_budget(0, {"eps": 8 / 255}, "c") == (8 / 255, "checkpoint")
    assert attack_budget(0, {"train": {"eps": 0.2}}, "c") == (0.2, "checkpoint")
    with pytest.raises(UserError, match="pass --eps"):
        attack_budget(0, {"arch": "cnn"}, "c")
    with pytest.raises(UserError, match="threat model"):
        attack_budget(0.1, {"threat_model": "L2"}, "c")


def test_train_flags_take_fractions(store, tmp_path, capsys):
    """`train --eps 8/255 --step-size 2/255` parses; the checkpoint records the value."""
    from pipeline.cli import main

    main(["train", "--cache", str(store), "--out", str(tmp_path / "r"), "--eps", "8/255", "--step-size", "2/255",
          "--max-steps", "1", "--dra-weight", "0", *TRAIN_ARGS])
    cfg = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg["eps"] == 8 / 255 and cfg["train"]["step_size"] == 2 / 255


def test_the_dataset_gives_trains_own_batches(store, tmp_path):
    """(image, label, target) of sample (row, view) = what train's batch assembly gives for the same
    pair, in RAM and streamed; the loader's batches are train's (same seed and batch size)."""
    rt = Runtime("cpu")
    data = trainer.open_data(train_cfg(store, tmp_path / "x", target_norm="none"), rt)
    rows, views = np.array([0, 5, 33, 63, 5]), np.array([1, 0, 1, 0, 1])
    want = assemble(Batch(rows, views, rows[:0], views[:0], 0, 0), data.real, None, data.pad)
    for stream in (False, True):
        ds = api.CacheDataset(store, stream=stream)
        assert (len(ds), ds.index(2 * 33 + 1)) == (64 * 2, (33, 1))
        for j, (r, v) in enumerate(zip(rows, views)):
            x, y, target = ds[int(r) * ds.k + int(v)]
            assert torch.equal(x, want["x"][j]) and y == int(want["y"][j])
            assert torch.equal(target, want["target"][j].float()) and target.dtype == torch.float32
    # the loader: train's sampler, train's assembly
    sampler = MixedSampler(n_real=64, k_real=2, batch_size=16, seed=3)
    loader = api.dataloader(store, batch_size=16, seed=3, stream=False)
    assert len(loader) == 4
    for epoch in range(2):  # each iteration is the next epoch
        for step, (x, y, target) in enumerate(loader):
            b = sampler.batch(epoch, step)
            ref = assemble(b, data.real, None, data.pad)
            assert torch.equal(x, ref["x"]) and torch.equal(y, ref["y"])
            assert torch.equal(target, ref["target"].float())
    streamed = api.dataloader(store, batch_size=16, seed=3, stream=True, target_norm="center")
    x, y, target = next(iter(streamed))  # chunk-aware order: other rows, the same kind of batch
    assert x.shape == (16, 1, 28, 28) and y.shape == (16,) and target.shape == (16, *data.target.shape)
    assert abs(float(target.mean())) < 1  # centred with the part's mean


def test_load_classifier_returns_the_classifier_and_the_dra_head(store, checkpoint):
    from pipeline.classifiers.zoo import load_classifier

    model, head, config = api.load_classifier(checkpoint)
    ema, _ = load_classifier(checkpoint)
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        assert torch.equal(model(x), ema(x)) and not model.training
        assert head(model.features(x)).shape == (4, open_cache(str(store)).default_target.size)
    assert config["train"]["dra_weight"] > 0 and config["cache"]["digest"] == open_cache(str(store)).attrs["digest"]


def test_the_five_line_example_runs(received, checkpoint, tmp_path):
    """The README's example, verbatim but for the two paths, in a fresh process; the module
    docstring holds the same lines."""
    assert EXAMPLE in api.__doc__.replace("\n    ", "\n")
    code = EXAMPLE.replace('"feats.zarr"', repr(str(received))).replace('"artifacts/train/at_dra"', repr(str(checkpoint)))
    code += "assert x.shape == (64, 1, 28, 28) and y.shape == (64,) and target.shape[0] == 64\n"
    code += "assert head is not None and config['arch'] == 'cnn'\n"
    proc = subprocess.run([sys.executable, "-W", "ignore", "-c", code], cwd=tmp_path, capture_output=True, text=True,
                          timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0, proc.stderr[-2000:]


@pytest.mark.e2e
def test_a_store_uploaded_alone_to_s3_verifies_and_trains(store, fmnist_shards, tmp_path):
    pytest.importorskip("s3fs", reason="the s3 extra (pip install .[s3]) is not installed")
    pytest.importorskip("moto.server", reason="moto[server] (dev extra) is not installed")
    import fsspec
    from test_s3 import BUCKET, moto_s3

    digest = open_cache(str(store)).attrs["digest"]
    with moto_s3() as env:
        url = f"s3://{BUCKET}/{tmp_path.name}/feats.zarr"
        fsspec.filesystem("s3", skip_instance_cache=True).put(str(store), url[len("s3://"):], recursive=True)
        proc = team(tmp_path, "cache", "verify", url, "--digest", digest, env=env)
        assert proc.returncode == 0 and proc.stdout.strip().endswith(f"{url}: ok"), proc.stderr[-2000:]
        proc = team(tmp_path, "train", "--cache", url, "--out", tmp_path / "run", "--memory-budget-mb", "0",
                    *TRAIN_ARGS, env=env)
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert sum(ln.startswith("note:") and "not reachable" in ln for ln in proc.stdout.splitlines()) == 1
    ckpt = json.loads((tmp_path / "run" / "config.json").read_text())
    assert ckpt["cache"]["image_check"] == {"train": "store"} and ckpt["cache"]["image_mode"] == "stream"
    proc = team(tmp_path, "evaluate", "--checkpoint", tmp_path / "run", "--shards", fmnist_shards / "test",
                "--out", tmp_path / "eval.json", "--n", "16", "--pgd-steps", "1", "--pgd-restarts", "1",
                "--autoattack", "none", "--check-n", "16", "--eps", "8/255")
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads((tmp_path / "eval.json").read_text())
    assert res["eps"] == 8 / 255 and res["eps_source"] == "--eps"


def test_load_classifier_rebuilds_the_head_of_an_align_layer_run(store, tmp_path):
    """A run trained with --align-layer has a per-location head on a classifier block: load_classifier
    rebuilds that kind (MapHead) with the run's weights, and ``project`` feeds it the block's map as
    training did; a run that does not record its target's shape is refused in one line."""
    from reliability_helpers import train_cfg
    from safetensors.torch import load_file

    from pipeline import api
    from pipeline.core.errors import UserError
    from pipeline.train.model import MapHead
    from stages import train

    out = tmp_path / "run"
    train.run(train_cfg(store, out, dra_weight=0.1, align_layer="body.1", max_steps=2))
    trained = api.load_classifier(out)
    assert isinstance(trained.head, MapHead) and trained.config["train"]["align_layer"] == "body.1"
    saved = {k[len("net.head."):]: v for k, v in load_file(str(out / "state.safetensors")).items()
             if k.startswith("net.head.")}
    assert all(torch.equal(trained.head.state_dict()[k], v) for k, v in saved.items())
    x = torch.rand(4, 1, 28, 28)
    with torch.no_grad():
        logits, projection = trained.project(x)
        assert torch.equal(logits, trained.classifier(x))
        assert projection.shape == (4, open_cache(str(store)).default_target.size)
    assert api.load_classifier(out, head=False).head is None
    config = json.loads((out / "config.json").read_text())
    del config["cache"]["target_shape"]
    (out / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="does not record its target's shape"):
        api.load_classifier(out)


def test_a_bundled_model_travels_with_the_store(tiny_model_dir, fmnist_shards, tmp_path):
    """extract --bundle-model: the model's files are in the store (and its manifest), named by their
    sha256; the store moved alone recomputes its rows from itself, and edited bundled weights fail
    verification."""
    from pipeline.cache.extractor import FeatureExtractor
    from pipeline.cache.store import verify_cache
    from pipeline.core.views import apply_views
    from pipeline.diffusion.model import load_model

    made = tmp_path / "made" / "f.zarr"
    extract.run(extract_cfg(tiny_model_dir, fmnist_shards, made, limit=16, bundle_model=True))
    moved = tmp_path / "elsewhere" / "deep" / "f.zarr"
    moved.parent.mkdir(parents=True)
    shutil.move(made, moved)  # the store alone: the model it was made with is not beside it
    assert verify_cache(str(moved)) == []
    cache = open_cache(str(moved))
    m = cache.attrs["model"]
    assert m["source"] == "./model" and m["bundled"] is True and m["bundled_from"].startswith("../")
    assert {"model/unet/config.json", "model/scheduler/scheduler_config.json", "model/model_info.json"} \
        <= set(cache.attrs["manifest"])
    assert cache.model_source == str(moved / "model")
    assert load_model(cache.model_source).weights_sha256 == m["weights_sha256"]
    # recompute rows from the store alone: its model, its images, its views and seeds
    target = cache.default_target
    part = cache.part("train", target)
    rows, views = np.arange(4), np.arange(4) % part.k
    x = torch.from_numpy(part.read_images(0, 4)).permute(0, 3, 1, 2).float() / 255
    x = apply_views(x, *(torch.from_numpy(part.views[k][rows, views]) for k in ("dx", "dy", "flip")),
                    cache.attrs["view_spec"]["pad"])
    got = FeatureExtractor.from_cache(cache, target)(x, torch.from_numpy(part.noise_seed[rows, views]),
                                                     torch.from_numpy(part.labels[rows]))
    stored = part.read(rows, views).astype(np.float32)
    assert np.allclose(got.numpy(), stored, rtol=2e-3, atol=2e-3)
    weights = next((moved / "model" / "unet").glob("*.safetensors"))
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    assert any(p.startswith("model/unet/") and "checksum" in p for p in verify_cache(str(moved)))


def test_train_can_require_the_digest_the_sender_gave(store, received, tmp_path, capsys):
    """--cache-digest: the store must be exactly the one the sender published (then its stored images
    need no note: the trusted digest covers the manifest that vouches for them); another digest or a
    malformed one is one error line, and nothing is written."""
    digest = open_cache(str(store)).attrs["digest"]
    from pipeline.cli import main

    main([str(a) for a in ["train", "--cache", received, "--out", tmp_path / "run", "--cache-digest", digest,
                           "--max-steps", "1", *TRAIN_ARGS]])
    out = capsys.readouterr().out
    assert (tmp_path / "run" / "metrics.json").exists() and "note:" not in out, out
    other = ("0" if digest[0] != "0" else "1") + digest[1:]
    for value, words in ((other, "is not the --cache-digest"), (digest.upper(), "64 lowercase hex")):
        code, _, err = run_cli(capsys, ["train", "--cache", received, "--out", tmp_path / "no", "--cache-digest",
                                        value, *TRAIN_ARGS])
        assert words in assert_one_error_line(code, err) and not (tmp_path / "no").exists()

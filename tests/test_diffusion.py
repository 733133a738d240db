"""The diffusion model: every load_model layout, training + exact resume, the stage and its refusals."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import UNet2DModel

from pipeline.cli import main
from pipeline.core.errors import UserError
from pipeline.core.shards import read_split
from pipeline.diffusion.config import DiffusionConfig
from pipeline.diffusion.model import load_model, make_scheduler, tiny_unet
from pipeline.diffusion.training import latest_checkpoint, train_ddpm
from stages import diffusion as stage


def forward(unet: UNet2DModel, labels: torch.Tensor | None) -> torch.Tensor:
    x = torch.randn(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return unet(x, torch.tensor([10, 200, 500, 999]), class_labels=labels).sample


@pytest.fixture(scope="module")
def tiny_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


def test_our_layout_round_trip(tiny_dir):
    m = load_model(str(tiny_dir))
    info = json.loads((tiny_dir / "model_info.json").read_text())
    assert (m.num_classes, m.null_class, m.image_size, m.in_channels) == (10, 10, 28, 1)
    assert m.weights_sha256 == info["weights_sha256"] and len(m.weights_sha256) == 64
    assert not m.unet.training and m.scheduler.config.num_train_timesteps == 1000
    # diffusers alone reads the same weights
    ref = UNet2DModel.from_pretrained(tiny_dir / "unet")
    y = torch.tensor([0, 3, 9, 10])
    assert torch.equal(forward(m.unet, y), forward(ref, y))


def test_hub_root_layout(tmp_path):
    """google/ddpm-cifar10-32 layout: UNet config + weights and scheduler_config.json at the root."""
    torch.manual_seed(1)
    unet = tiny_unet(32, 3, None)
    unet.save_pretrained(tmp_path)
    make_scheduler(1000, "linear").save_pretrained(tmp_path)
    assert (tmp_path / "config.json").is_file() and (tmp_path / "scheduler_config.json").is_file()
    m = load_model(str(tmp_path))
    assert (m.num_classes, m.null_class, m.image_size, m.in_channels) == (None, None, 32, 3)
    assert not m.conditional and m.scheduler.config.beta_schedule == "linear"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(m.unet(x, 5).sample, unet.eval()(x, 5).sample)


def test_pipeline_layout_without_info(tiny_dir, tmp_path):
    shutil.copytree(tiny_dir / "unet", tmp_path / "unet")
    shutil.copytree(tiny_dir / "scheduler", tmp_path / "scheduler")
    m = load_model(str(tmp_path))
    assert (m.num_classes, m.null_class) == (10, 10)
    assert m.weights_sha256 == load_model(str(tiny_dir)).weights_sha256


def test_bad_models_refused(tmp_path, tiny_dir):
    with pytest.raises(UserError, match="not found"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(UserError, match="not a diffusers model folder"):
        load_model(str(tmp_path))
    with pytest.raises(UserError, match="hub"):  # no network here: one clear line
        load_model("nobody-xyz/no-such-model-123")
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (broken / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError):
        load_model(str(broken))


def small_cfg(**kw) -> DiffusionConfig:
    # fp32 here: the first bf16 steps of a new shape pay a one-off kernel set-up (~5 s each)
    return replace(DiffusionConfig(block_channels=(8, 16), steps=4, batch_size=16, lr=1e-3,
                                   warmup_steps=2, checkpoint_every=2, bf16=False), **kw)


def test_training_is_finite_and_resume_equals_uninterrupted(fmnist_shards, tmp_path):
    data = read_split(fmnist_shards / "train", limit=64)
    cfg = small_cfg()

    def train(ckpt: Path):
        torch.manual_seed(0)
        unet = tiny_unet(28, 1, 10)
        return train_ddpm(data.images, data.labels, unet, make_scheduler(), cfg, ckpt, progress=False)

    full = train(tmp_path / "a")
    assert len(full.losses) == 4 and np.isfinite([v for _, v in full.losses]).all()
    assert latest_checkpoint(tmp_path / "a").name == "step-0000002"  # the last one before the end
    resumed = train(tmp_path / "a")  # picks up the step-2 checkpoint, runs steps 2 and 3 only
    assert resumed.resumed_from == 2
    assert resumed.losses == full.losses
    for p, q in zip(full.ema_unet.parameters(), resumed.ema_unet.parameters()):
        assert torch.equal(p, q)
    with pytest.raises(UserError, match="different settings"):
        torch.manual_seed(0)
        train_ddpm(data.images, data.labels, tiny_unet(28, 1, 10), make_scheduler(),
                   replace(cfg, lr=5e-3), tmp_path / "a", progress=False)


def test_stage_trains_and_writes_complete_folder(fmnist_shards, tmp_path):
    out = tmp_path / "diffusion"
    info = stage.run(small_cfg(shards=str(fmnist_shards / "train"), out=str(out), limit=64, steps=3,
                               checkpoint_every=0))
    for name in ("unet", "scheduler", "model_info.json", "loss.png", "loss.csv"):
        assert (out / name).exists(), name
    assert not (tmp_path / "diffusion.tmp").exists() and not (tmp_path / "diffusion.ckpt").exists()
    assert np.isfinite(info["final_loss"]) and info["classes"][0] == "T-shirt/top"
    # what ran is recorded: this config asks for fp32, so fp32 on any processor (the bf16 branch,
    # forced both ways on every machine: test_precision.py)
    assert info["precision"] == "fp32" and info["cpu"]
    m = load_model(str(out))
    assert m.num_classes == 10 and m.weights_sha256 == info["weights_sha256"]
    torch.manual_seed(123)  # whatever the global state, the stage starts from the same weights
    again = stage.run(small_cfg(shards=str(fmnist_shards / "train"), out=str(tmp_path / "again"), limit=64,
                                steps=3, checkpoint_every=0))
    assert again["weights_sha256"] == info["weights_sha256"]  # a rerun trains the same model


def test_snapshots_are_the_ema_model_of_their_step(fmnist_shards, tmp_path):
    """--snapshot-every: a loadable model folder of the EMA weights every N steps, beside OUT (kept
    after the run, unlike the checkpoints); the last one is the saved model, weight for weight."""
    out = tmp_path / "diffusion"
    info = stage.run(small_cfg(shards=str(fmnist_shards / "train"), out=str(out), limit=64, steps=4,
                               checkpoint_every=0, snapshot_every=2))
    snaps = sorted(p.name for p in (tmp_path / "diffusion.snapshots").iterdir())
    assert snaps == ["step-0000002", "step-0000004"]
    last = load_model(str(tmp_path / "diffusion.snapshots" / "step-0000004"))
    assert last.weights_sha256 == info["weights_sha256"]
    first = load_model(str(tmp_path / "diffusion.snapshots" / "step-0000002"))
    assert first.weights_sha256 != info["weights_sha256"] and first.num_classes == 10
    meta = json.loads((tmp_path / "diffusion.snapshots" / "step-0000002" / "model_info.json").read_text())
    assert meta["step"] == 2 and meta["config"]["steps"] == 4


def test_existing_model_pointer(tiny_dir, tmp_path):
    out = tmp_path / "pointer"
    stage.run(DiffusionConfig(pretrained=str(tiny_dir), out=str(out)))
    info = json.loads((out / "model_info.json").read_text())
    assert info["source"] == str(tiny_dir.resolve()) and not info["trained"]
    m = load_model(str(out))
    assert m.source == str(out) and m.weights_sha256 == load_model(str(tiny_dir)).weights_sha256


def run_cli(capsys, *args: str) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        main(list(args))
    return exc.value.code, capsys.readouterr().err


def test_cli_refuses_bad_input(tmp_path, capsys):
    code, err = run_cli(capsys, "diffusion", "--pretrained", str(tmp_path / "nope"), "--out", str(tmp_path / "o"))
    assert code == 2 and err.startswith("error:") and "Traceback" not in err and err.count("\n") == 1
    assert not (tmp_path / "o").exists()
    code, err = run_cli(capsys, "diffusion", "--steps", "0", "--out", str(tmp_path / "o"))
    assert code == 2 and "--steps" in err
    code, err = run_cli(capsys, "diffusion", "--shards", str(tmp_path), "--out", str(tmp_path / "o"))
    assert code == 2 and "fingerprint" in err and not (tmp_path / "o").exists()

"""Stage `diffusion`: train a small class-conditional DDPM on the real train shards, or point at
an existing diffusers UNet2DModel (``--model``) without training.

Output folder (written as OUT.tmp and renamed, so OUT is complete or absent)::

    OUT/unet/  OUT/scheduler/   save_pretrained folders (diffusers loads them without this code)
    OUT/model_info.json         num_classes, null_class, image size, weights sha256, config, loss
    OUT/loss.png  OUT/loss.csv  training loss per step

Checkpoints go to OUT.ckpt/step-NNNNNNN every ``checkpoint_every`` steps; re-running the same
command resumes from the newest one, and the folder is removed once OUT is written.

Default size (2 CPU cores, bf16 autocast): a 28 px UNet with channels 32/64/64, no attention,
~1.1M parameters; see ``DEFAULT_SIZING`` for the measured step time. A larger setting for one GPU
(CIFAR-10 32 px, ~35M parameters, about an hour on an H100)::

    python -m pipeline diffusion --block-channels 128,256,256,256 --layers-per-block 2 \\
        --attention --steps 100000 --batch-size 256 --lr 2e-4 --warmup-steps 1000
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline import storage
from pipeline.config import DiffusionConfig
from pipeline.diffusion import (
    build_unet,
    load_model,
    make_scheduler,
    pointer_info,
    save_model,
)
from pipeline.errors import UserError, check_out, refuse_non_finite
from pipeline.shards import read_split

SIGNATURE = ("model_info.json",)  # the file that marks a finished output folder of this stage
DEFAULT_SIZING = "measured on 2 shared CPU cores: ~0.3 s per 128-image bf16 step (see README)"


def ckpt_dir(out: str) -> Path:
    return Path(out).with_name(Path(out).name + ".ckpt")


def check(cfg: DiffusionConfig) -> None:
    """Refuse bad settings before any heavy work."""
    refuse_non_finite(cfg)
    if cfg.steps <= 0 or cfg.batch_size <= 0:
        raise UserError(f"--steps and --batch-size must be positive, got {cfg.steps}, {cfg.batch_size}")
    if not 0.0 <= cfg.class_dropout < 1.0:
        raise UserError(f"--class-dropout must be in [0, 1), got {cfg.class_dropout}")
    if cfg.lr <= 0 or not 0.0 < cfg.ema_decay < 1.0:
        raise UserError(f"--lr must be > 0 and --ema-decay in (0, 1), got {cfg.lr}, {cfg.ema_decay}")
    if not cfg.block_channels or min(cfg.block_channels) <= 0 or cfg.layers_per_block <= 0:
        raise UserError(f"bad UNet size: block_channels={cfg.block_channels}, "
                        f"layers_per_block={cfg.layers_per_block}")
    if cfg.warmup_steps < 0 or cfg.checkpoint_every < 0 or cfg.limit < 0:
        raise UserError("--warmup-steps, --checkpoint-every and --limit must be >= 0")
    check_out(cfg.out, folder=True)
    storage.refuse_foreign(cfg.out, SIGNATURE)
    ckpt = ckpt_dir(cfg.out)
    if not storage.is_url(cfg.out) and ckpt.exists() and (not ckpt.is_dir() or any(
            not p.name.startswith("step-") for p in ckpt.iterdir())):
        raise UserError(f"{ckpt} exists and holds more than this stage's step-* checkpoints (it is removed "
                        "after training): it is left as it is; remove it or choose another --out")


def loss_plot(losses: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, vals = zip(*losses)
    k = max(1, len(vals) // 50)  # running mean over ~2% of the run
    smooth = [sum(vals[max(0, i - k + 1): i + 1]) / len(vals[max(0, i - k + 1): i + 1]) for i in range(len(vals))]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, vals, alpha=0.3, lw=0.8, label="step")
    ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step"), ax.set_ylabel("MSE (epsilon)"), ax.set_yscale("log")
    ax.legend(), ax.set_title("diffusion training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def use_existing(cfg: DiffusionConfig) -> dict:
    model = load_model(cfg.model)  # raises UserError for a bad path / unreachable hub
    info = pointer_info(model, cfg.model)
    tmp = Path(storage.start(cfg.out, signature=SIGNATURE))
    (tmp / "model_info.json").write_text(json.dumps(info, indent=2))
    storage.commit(str(tmp), cfg.out, signature=SIGNATURE)
    kind = f"{model.num_classes} classes" if model.conditional else "unconditional"
    print(f"using {info['source']} ({kind}, {model.image_size} px) -> {cfg.out}/model_info.json")
    return info


def run(cfg: DiffusionConfig) -> dict:
    check(cfg)
    if cfg.model:
        return use_existing(cfg)
    from pipeline.diffusion_train import train_ddpm

    data = read_split(cfg.shards, limit=cfg.limit, progress=True)
    num_classes = int(data.fingerprint["num_classes"])
    h, w, c = data.images.shape[1:]
    if h != w:
        raise UserError(f"{cfg.shards}: images are {h}x{w}; the UNet needs square images")
    torch.manual_seed(cfg.seed)  # the initial weights: without this, two runs train two different models
    unet = build_unet(image_size=h, in_channels=c, num_classes=num_classes,
                      block_channels=cfg.block_channels, layers_per_block=cfg.layers_per_block,
                      norm_groups=math.gcd(32, *cfg.block_channels), attention=cfg.attention)
    scheduler = make_scheduler(cfg.num_train_timesteps, cfg.beta_schedule)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"diffusion: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
          f"{len(data.labels)} images, {cfg.steps} steps of {cfg.batch_size} on {device}")
    t0 = time.time()
    res = train_ddpm(data.images, data.labels, unet, scheduler, cfg, ckpt_dir(cfg.out), device=device)
    seconds = time.time() - t0
    tmp = Path(storage.start(cfg.out, signature=SIGNATURE))
    config = {**asdict(cfg), "block_channels": list(cfg.block_channels)}
    info = save_model(tmp, res.ema_unet.cpu(), scheduler, {
        "trained": True, "classes": data.fingerprint["classes"], "config": config,
        "final_loss": res.final_loss, "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, cfg.steps - res.resumed_from), 4),
        "resumed_from_step": res.resumed_from,
        "data": {"path": str(cfg.shards), "content_hash": data.fingerprint["content_hash"],
                 "count": len(data.labels)}})
    (tmp / "loss.csv").write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in res.losses))
    loss_plot(res.losses, tmp / "loss.png")
    storage.commit(str(tmp), cfg.out, signature=SIGNATURE)
    shutil.rmtree(ckpt_dir(cfg.out), ignore_errors=True)
    print(f"diffusion: final loss {res.final_loss:.4f}, {seconds:.0f} s "
          f"({info['seconds_per_step']} s/step) -> {cfg.out}")
    return info

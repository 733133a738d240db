"""Stage `diffusion`: train a small class-conditional DDPM on the real train shards, or point at
an existing diffusers UNet2DModel (``--pretrained``) without training.

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

import math
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import torch

from pipeline.core import storage
from pipeline.core.errors import UserError
from pipeline.core.runtime import choose_device, cpu_model, precision
from pipeline.core.shards import read_split
from pipeline.diffusion.config import DiffusionConfig
from pipeline.diffusion.model import build_unet, make_scheduler, save_model
from pipeline.diffusion.stage_io import SIGNATURE, check, ckpt_dir, loss_plot, use_existing

DEFAULT_SIZING = "measured on 2 shared CPU cores: ~0.3 s per 128-image bf16 step (see README)"


def run(cfg: DiffusionConfig) -> dict:
    check(cfg)
    if cfg.pretrained:
        return use_existing(cfg)
    from pipeline.diffusion.training import train_ddpm

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
    device = str(choose_device("auto"))
    print(f"diffusion: {sum(p.numel() for p in unet.parameters()) / 1e6:.2f}M parameters, "
          f"{len(data.labels)} images, {cfg.steps} steps of {cfg.batch_size} on {device}")
    t0 = time.time()
    config = {**asdict(cfg), "block_channels": list(cfg.block_channels)}
    record = {"trained": True, "classes": data.fingerprint["classes"], "config": config,
              "data": {"path": str(cfg.shards), "content_hash": data.fingerprint["content_hash"],
                       "count": len(data.labels)}}

    def snapshot(step: int, ema_unet) -> None:  # a loadable model folder of the EMA weights at this step
        folder = Path(f"{cfg.out}.snapshots") / f"step-{step:07d}"
        shutil.rmtree(folder, ignore_errors=True)
        save_model(folder, ema_unet, scheduler, {**record, "step": step, "precision": precision(cfg.bf16, device)})

    res = train_ddpm(data.images, data.labels, unet, scheduler, cfg, ckpt_dir(cfg.out), device=device,
                     snapshot=snapshot if cfg.snapshot_every and not storage.is_url(cfg.out) else None)
    seconds = time.time() - t0
    tmp = Path(storage.start(cfg.out, signature=SIGNATURE))
    info = save_model(tmp, res.ema_unet.cpu(), scheduler, {
        **record,
        "final_loss": res.final_loss, "train_seconds": round(seconds, 1),
        "seconds_per_step": round(seconds / max(1, cfg.steps - res.resumed_from), 4),
        "resumed_from_step": res.resumed_from,
        # what ran, not what was asked: bf16 only where the device has it natively (weights differ)
        "precision": precision(cfg.bf16, device), "cpu": cpu_model()})
    (tmp / "loss.csv").write_text("step,loss\n" + "".join(f"{s},{v}\n" for s, v in res.losses))
    loss_plot(res.losses, tmp / "loss.png")
    storage.commit(str(tmp), cfg.out, signature=SIGNATURE)
    shutil.rmtree(ckpt_dir(cfg.out), ignore_errors=True)
    print(f"diffusion: final loss {res.final_loss:.4f}, {seconds:.0f} s "
          f"({info['seconds_per_step']} s/step) -> {cfg.out}")
    return info


def interrupted(cfg: DiffusionConfig) -> str:
    """What an interrupt leaves (the CLI's one line): the newest checkpoint, which a rerun resumes."""
    from pipeline.diffusion.training import latest_checkpoint

    ckpt = latest_checkpoint(ckpt_dir(cfg.out)) if not cfg.pretrained and not storage.is_url(cfg.out) else None
    if ckpt is None:
        return f"no checkpoint yet, {cfg.out} not written; rerun the same command"
    return f"checkpoint {ckpt.name} kept in {ckpt.parent}; rerun the same command to resume from it"

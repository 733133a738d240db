"""Training loop of the class-conditional DDPM: epsilon prediction, label dropout, EMA, resume.

Why it looks like this:
* noise is added through ``scheduler.add_noise`` (never a hand-rolled formula), so the trained
  model and every consumer agree on the schedule;
* a random ``class_dropout`` share of labels is replaced by the null class (index num_classes),
  which gives classifier-free guidance and an unconditional embedding for extraction;
* all randomness of step s comes from generators seeded by (seed, s) and the data order of
  epoch e from (seed, e), so a run resumed from any checkpoint equals an uninterrupted one;
* checkpoints are safetensors + JSON (no pickles), one folder per step, ``state.json`` last.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DModel
from diffusers.training_utils import EMAModel
from safetensors.torch import load_file, save_file
from tqdm import tqdm

from pipeline.core.errors import UserError
from pipeline.core.runtime import precision
from pipeline.diffusion.config import DiffusionConfig

# config fields that may change between a checkpoint and its resumption
RESUMABLE_CHANGES = {"steps", "checkpoint_every", "snapshot_every", "out", "shards"}


@dataclass
class TrainResult:
    ema_unet: UNet2DModel  # EMA weights copied in, eval mode
    losses: list[tuple[int, float]]
    final_loss: float  # mean training loss over the last 10% of steps
    resumed_from: int


def lr_at(step: int, cfg: DiffusionConfig) -> float:
    """Linear warm-up, then cosine decay to 10% of ``lr`` (a pure function: nothing to resume)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))


def _gen(seed: int, *parts: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, *parts]).generate_state(1)[0]))


class _Batches:
    """Epoch-wise shuffled batches; batch s is a pure function of (seed, s)."""

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.b, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, torch.empty(0, dtype=torch.long)

    def _perm_of(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch, self._perm = epoch, torch.randperm(self.n, generator=_gen(self.seed, 1, epoch))
        return self._perm

    def indices(self, step: int) -> torch.Tensor:
        pos = torch.arange(step * self.b, (step + 1) * self.b)
        return torch.cat([self._perm_of(int(e))[pos[pos // self.n == e] % self.n]
                          for e in torch.unique(pos // self.n)])


def _config_dict(cfg: DiffusionConfig) -> dict:
    d = asdict(cfg)
    d["block_channels"] = list(cfg.block_channels)
    return d


def save_checkpoint(ckpt_dir: Path, step: int, unet: UNet2DModel, ema: EMAModel,
                    opt: torch.optim.Optimizer, losses: list, cfg: DiffusionConfig) -> None:
    """One folder per step (state.json written last); older checkpoints are removed after."""
    folder = ckpt_dir / f"step-{step:07d}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, folder / "unet.safetensors")
    save_file({f"p{i}": p.contiguous() for i, p in enumerate(ema.shadow_params)}, folder / "ema.safetensors")
    sd = opt.state_dict()
    save_file({f"{i}.{k}": v.contiguous() for i, st in sd["state"].items()
               for k, v in st.items()}, folder / "optim.safetensors")
    ema_scalars = {k: v for k, v in ema.state_dict().items() if k != "shadow_params"}
    state = {"step": step, "losses": losses, "ema": ema_scalars, "param_groups": sd["param_groups"],
             "config": _config_dict(cfg)}
    (folder / "state.json").write_text(json.dumps(state))
    for old in ckpt_dir.glob("step-*"):
        if old != folder:
            shutil.rmtree(old, ignore_errors=True)


def latest_checkpoint(ckpt_dir: Path) -> Path | None:
    done = sorted(p for p in ckpt_dir.glob("step-*") if (p / "state.json").is_file())
    return done[-1] if done else None


def load_checkpoint(folder: Path, unet: UNet2DModel, ema: EMAModel, opt: torch.optim.Optimizer,
                    cfg: DiffusionConfig) -> tuple[int, list]:
    state = json.loads((folder / "state.json").read_text())
    now = _config_dict(cfg)
    diff = sorted(k for k in now if k not in RESUMABLE_CHANGES and state["config"].get(k) != now[k])
    if diff:
        raise UserError(f"checkpoint {folder} was made with different settings ({', '.join(diff)}); "
                        "use the same settings or delete the checkpoint folder")
    unet.load_state_dict(load_file(folder / "unet.safetensors"))
    shadow = load_file(folder / "ema.safetensors")
    ema.load_state_dict({**state["ema"], "shadow_params": [shadow[f"p{i}"] for i in range(len(shadow))]})
    flat = load_file(folder / "optim.safetensors")
    opt_state: dict = {}
    for key, v in flat.items():
        i, name = key.split(".", 1)
        opt_state.setdefault(int(i), {})[name] = v
    opt.load_state_dict({"state": opt_state, "param_groups": state["param_groups"]})
    return int(state["step"]), [tuple(x) for x in state["losses"]]


def train_ddpm(images: np.ndarray, labels: np.ndarray, unet: UNet2DModel, scheduler: DDPMScheduler,
               cfg: DiffusionConfig, ckpt_dir: Path, *, device: str = "cpu", progress: bool = True,
               snapshot: Callable[[int, UNet2DModel], None] | None = None) -> TrainResult:
    """Train ``unet`` on uint8 (N,H,W,C) images; resumes from the newest checkpoint in ckpt_dir.

    ``snapshot(step, unet)`` is called every ``cfg.snapshot_every`` steps with the EMA weights
    swapped in (and swapped out again after): the model as it would be saved at that step."""
    torch.manual_seed(cfg.seed)
    x_all = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)
    y_all = torch.from_numpy(labels).long()
    conditional = unet.config.num_class_embeds is not None
    null = (unet.config.num_class_embeds or 1) - 1
    unet.to(device).train()
    opt = torch.optim.AdamW(unet.parameters(), lr=cfg.lr, weight_decay=0.0)
    ema = EMAModel(unet.parameters(), decay=cfg.ema_decay, use_ema_warmup=True, power=3 / 4)
    start, losses = 0, []
    if (ck := latest_checkpoint(ckpt_dir)) is not None:
        start, losses = load_checkpoint(ck, unet, ema, opt, cfg)
    ema.to(device)
    batches = _Batches(len(x_all), cfg.batch_size, cfg.seed)
    t_max = scheduler.config.num_train_timesteps
    amp = precision(cfg.bf16, device) == "bf16"
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, desc="diffusion",
               mininterval=2, disable=not progress)
    for step in bar:
        idx = batches.indices(step)
        g = _gen(cfg.seed, 2, step)
        x0, y = x_all[idx].to(device), y_all[idx].to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = torch.randint(0, t_max, (len(idx),), generator=g).to(device)
        drop = (torch.rand(len(idx), generator=g) < cfg.class_dropout).to(device)
        y = torch.where(drop, torch.full_like(y, null), y) if conditional else None
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16, enabled=amp):
            pred = unet(scheduler.add_noise(x0, noise, t), t, class_labels=y).sample
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        opt.step()
        ema.step(unet.parameters())
        if not torch.isfinite(loss):
            raise RuntimeError(f"diffusion loss became {loss.item()} at step {step}; lower --lr")
        losses.append((step, round(loss.item(), 6)))
        bar.set_postfix(loss=f"{loss.item():.4f}", refresh=False)
        if snapshot is not None and cfg.snapshot_every and (step + 1) % cfg.snapshot_every == 0:
            ema.store(unet.parameters())
            ema.copy_to(unet.parameters())
            snapshot(step + 1, unet.eval())
            ema.restore(unet.parameters())
            unet.train()
        if cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0 and step + 1 < cfg.steps:
            save_checkpoint(ckpt_dir, step + 1, unet, ema, opt, losses, cfg)
    bar.close()
    ema.copy_to(unet.parameters())
    tail = [v for _, v in losses[-max(1, len(losses) // 10):]]
    return TrainResult(unet.eval(), losses, float(np.mean(tail)) if tail else float("nan"), start)

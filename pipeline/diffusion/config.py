"""Defaults of `diffusion`."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.core.config import require


@dataclass(frozen=True)
class DiffusionConfig:
    shards: str = "artifacts/shards/real/train"  # the real train split's shards (from `prepare`)
    out: str = "artifacts/diffusion"  # output folder of the UNet + scheduler (checkpoints in OUT.ckpt)
    pretrained: str = ""  # an existing diffusers UNet2DModel (folder or hub id): point at it instead of training
    block_channels: tuple[int, ...] = (32, 64, 64)  # UNet channels per resolution level (comma list)
    layers_per_block: int = 1  # ResNet layers per UNet block
    num_train_timesteps: int = 1000  # diffusion timesteps T of the noise schedule
    beta_schedule: str = "squaredcos_cap_v2"  # a diffusers DDPMScheduler beta schedule (linear, scaled_linear, ...)
    class_dropout: float = 0.1  # label dropout: the null class is index num_classes
    steps: int = 600  # training steps (~6.5 min on 2 CPU cores, bf16; the GPU setting: stages/diffusion.py)
    batch_size: int = 128  # images per training step
    lr: float = 5e-4  # AdamW peak learning rate
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 10% of lr
    attention: bool = False  # self-attention at the lowest resolution (slow on CPU)
    limit: int = 0  # train on the first N real images (0: all)
    ema_decay: float = 0.999  # EMA of the weights (the saved model)
    bf16: bool = True  # autocast on GPUs and on CPUs with native bf16 (AVX512-BF16/AMX); fp32 elsewhere
    checkpoint_every: int = 100  # steps between checkpoints in OUT.ckpt (0: none); a rerun resumes from the newest
    snapshot_every: int = 0  # every N steps also save the EMA model as a loadable folder OUT.snapshots/step-N (quality-vs-steps curves; 0: none)
    seed: int = 0  # initial weights, batches and noise

    def validate(self) -> None:
        require(self, [
            (self.steps > 0 and self.batch_size > 0,
             f"--steps and --batch-size must be positive, got {self.steps}, {self.batch_size}"),
            (0.0 <= self.class_dropout < 1.0, f"--class-dropout must be in [0, 1), got {self.class_dropout}"),
            (self.lr > 0 and 0.0 < self.ema_decay < 1.0,
             f"--lr must be > 0 and --ema-decay in (0, 1), got {self.lr}, {self.ema_decay}"),
            (bool(self.block_channels) and min(self.block_channels, default=0) > 0 and self.layers_per_block > 0,
             f"bad UNet size: block_channels={self.block_channels}, layers_per_block={self.layers_per_block}"),
            (min(self.warmup_steps, self.checkpoint_every, self.limit, self.snapshot_every) >= 0,
             "--warmup-steps, --checkpoint-every and --limit must be >= 0")])

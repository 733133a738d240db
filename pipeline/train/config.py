"""Defaults of `train` (stage two) and its closed sets."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from enum import Enum

from pipeline.classifiers.archs import Arch
from pipeline.core.config import coerce_enums, require
from pipeline.core.views import ViewRequest


class Method(str, Enum):
    pgd = "pgd"  # Madry et al.: cross-entropy on PGD examples
    trades = "trades"  # Zhang et al.: clean CE + beta * KL(clean || adv)


class LRSchedule(str, Enum):
    cosine = "cosine"  # cosine decay to 0
    onecycle = "onecycle"  # linear warm-up from lr/25 over 30% of the steps, then cosine decay to 0


class DRASchedule(str, Enum):
    constant = "constant"  # the weight throughout
    linear_warmup = "linear-warmup"  # 0 -> weight over the first quarter of training
    cosine_decay = "cosine-decay"  # weight -> 0 over training


class TargetNorm(str, Enum):
    none = "none"  # the cached targets as they are
    center = "center"  # subtract the cache's per-dimension mean (removes the shared direction)
    whiten = "whiten"  # and divide by its per-dimension std
    pca = "pca"  # centre, then PCA-whiten: every principal direction of the train targets at unit variance


class AlignInput(str, Enum):
    adv = "adv"  # the head reads the adversarial view's features (as the paper)
    clean = "clean"  # the clean view's (an extra forward with its own batch statistics; the attack cannot move the term)
    both = "both"  # the mean of the adversarial and the clean view's DRA terms


@dataclass(frozen=True)
class TrainConfig:
    cache: str = "artifacts/feats.zarr"  # the feature cache (from `extract`; path or fsspec URL)
    out: str = "artifacts/train/default"  # run folder: checkpoints, log, model, metrics
    # the digest the store must have (64 hex digits, given by its sender through a channel you
    # trust; `cache info` prints a store's); "": any complete store whose files match its manifest
    cache_digest: str = ""
    real_shards: str = ""  # "": the real train shard folder the cache records
    synthetic_shards: str = ""  # "": the synthetic shard folder the cache records
    arch: Arch = Arch.cnn  # classifier architecture
    method: Method = Method.pgd  # adversarial training loss
    eps: float = 0.1  # Linf budget of the training attack (images in [0, 1])
    attack_steps: int = 5  # PGD steps of the training attack (0: clean training)
    step_size: float = 0.03  # PGD step size of the training attack
    trades_beta: float = 6.0  # TRADES: weight of the KL term
    # 0.1: the sweep's choice (README "Tuning t, layer and lambda"; 0.5 and 1 lost up to 3 and 4 PGD points)
    dra_weight: float = 0.1  # lambda, the DRA loss's weight (0: plain adversarial training)
    t: int | None = None  # the cache's target set at this timestep (unset: the cache's default set's)
    layer: str = ""  # ... and this layer ("": the default set's); a set the cache lacks is refused
    dra_schedule: DRASchedule = DRASchedule.constant  # how the DRA weight changes over training
    head_hidden: int = 256  # hidden width of the DRA projection head
    # a classifier block whose (B, C, H, W) map the head reads (cnn: body.0, body.1, body.2; an unknown
    # name is refused with the list); on a grid target (extract --pooling grid4) it aligns per location
    align_layer: str = ""  # classifier block the DRA head reads ("": the final pooled features)
    align_input: AlignInput = AlignInput.adv  # which input's features the DRA head aligns to the clean view's target
    dra_grad_every: int = 20  # measure the DRA term's share of the backbone gradient every N steps of an epoch (0: never)
    target_norm: TargetNorm = TargetNorm.center  # how DRA targets are normalised, with the cache's train mean/std
    synthetic_fraction: float = 0.0  # exact per-batch share of synthetic samples (DM-AT: 0.7)
    real_limit: int = 0  # train on the first N real samples of the cache (0: all of them)
    epochs: int = 4  # passes over the real samples
    max_steps: int = 0  # stop after this many steps (0: epochs x steps per epoch); equal budgets across variants
    batch_size: int = 128  # global batch (split over processes)
    # measured: 0.2 beats 0.05 (62% vs 51% clean, 44% vs 36% PGD-10) after 156 steps
    lr: float = 0.2  # SGD peak learning rate
    momentum: float = 0.9  # SGD momentum
    weight_decay: float = 5e-4  # SGD weight decay
    lr_schedule: LRSchedule = LRSchedule.cosine  # learning-rate schedule over the steps
    label_smoothing: float = 0.1  # of the cross-entropy terms
    ema_decay: float = 0.995  # EMA of the weights (the saved and evaluated classifier; 0: the live weights)
    image_size: int = 0  # 0: the cache's; otherwise a cache of another size is refused
    # the augmentation (crop padding, flips) and the normalisation are the cache's: a value given
    # here must equal the cache's (a pad-4 CIFAR cache trains without --view-pad 4)
    view: ViewRequest = field(default_factory=ViewRequest)
    # a new random crop + flip per sample and step (standard on-the-fly augmentation) instead of the
    # cache's recorded views; plain AT only (no cached target belongs to an unrecorded view)
    fresh_views: bool = False
    # off: every sample is read in its view 0, which must be the unaugmented image (a `--views all` or
    # identity-first store; else refused): training without augmentation, on the same store and targets
    augment: bool = True  # draw each sample's view among the cache's recorded views (off: no augmentation)
    memory_budget_mb: int = 2048  # the target reader streams chunks above this (0: always stream)
    # per-epoch validation (pipeline/train/validation.py): the EMA model's clean and PGD accuracy on N
    # train-part rows right after the ones trained on; the best epoch is kept in OUT/best
    val_n: int = 0  # held-out train rows measured after every epoch (0: no validation)
    val_pgd_steps: int = 10  # PGD steps of the per-epoch validation
    val_every: int = 1  # validate after every Nth epoch and after the last (epochs of a few steps: validation would cost more than training)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: end of each epoch only)
    log_every: int = 10  # optimizer steps between per-step metric rows, and each epoch's last step (DVCLive: OUT/dvclive/)
    online: bool = False  # compute targets with the diffusion model inside the step, replaying the cache's recorded noise (not fresh noise)
    resume: bool = False  # continue the unfinished run in --out from its checkpoint
    overwrite: bool = False  # replace the run in --out, finished or not (without it, a run there is refused)
    verify: bool = True  # checksums + NaN/Inf scan of the cache parts read, before training (off: trust the store)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # weights, batch order, attack starts

    def __post_init__(self) -> None:
        coerce_enums(self)

    def validate(self) -> None:
        """Every range check of `train`, before any file is opened."""
        require(self, [(self.epochs >= 1, "--epochs must be >= 1"), (self.batch_size >= 2, "--batch-size must be >= 2"),
                       (self.eps >= 0 and self.step_size >= 0, "--eps and --step-size must be >= 0"),
                       (self.attack_steps >= 0, "--attack-steps must be >= 0"), (self.lr > 0, "--lr must be > 0"),
                       (self.dra_weight >= 0, "--dra-weight must be >= 0"),
                       (self.t is None or self.t >= 0, f"--t must be a timestep >= 0 (or unset: the default set), got {self.t}"),
                       (self.real_limit >= 0, "--real-limit must be >= 0"),
                       (self.val_n >= 0 and self.val_pgd_steps >= 1 and self.val_every >= 1,
                        "--val-n must be >= 0, --val-pgd-steps and --val-every >= 1"),
                       (0 <= self.synthetic_fraction < 1, "--synthetic-fraction must be in [0, 1)"),
                       (0 <= self.ema_decay < 1, "--ema-decay must be in [0, 1)"),
                       (1 <= self.head_hidden <= 65536, f"--head-hidden must be in [1, 65536], got {self.head_hidden}"),
                       (self.dra_grad_every >= 0, "--dra-grad-every must be >= 0"),
                       (self.memory_budget_mb >= 0, "--memory-budget-mb must be >= 0"),
                       (self.image_size >= 0, "--image-size must be >= 0"),
                       (self.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
                       (not self.cache_digest or re.fullmatch(r"[0-9a-f]{64}", self.cache_digest) is not None,
                        f"--cache-digest must be 64 lowercase hex digits, got {self.cache_digest!r}"),
                       (self.log_every >= 1, f"--log-every must be >= 1, got {self.log_every}"),
                       (self.max_steps >= 0, "--max-steps must be >= 0"), (bool(self.out), "--out is empty"),
                       (self.trades_beta >= 0, "--trades-beta must be >= 0"),
                       (self.weight_decay >= 0, "--weight-decay must be >= 0"),
                       (0 <= self.momentum < 1, "--momentum must be in [0, 1)"),
                       (0 <= self.label_smoothing < 1, "--label-smoothing must be in [0, 1)"),
                       (not (self.resume and self.overwrite),
                        "--resume and --overwrite: choose one (continue the run in --out, or replace it)"),
                       (not self.fresh_views or self.dra_weight == 0,
                        "--fresh-views draws views the cache holds no targets for: use it with --dra-weight 0"),
                       (self.augment or not self.fresh_views,
                        "--fresh-views and --no-augment: choose one (fresh crops and flips, or none)")])
        self.view.validate()

"""Every default of the project, in one place: one frozen dataclass per stage.

The CLI and ``params.yaml`` pass values in; nothing deeper in the library reads YAML or the
environment. Paths are strings so that fsspec URLs (``s3://``, ``memory://``) pass through.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from pipeline.errors import UserError


class SourceFormat(str, Enum):
    """Raw dataset formats that ``prepare`` reads."""

    auto = "auto"
    idx = "idx"  # MNIST/Fashion-MNIST IDX files (optionally .gz)
    cifar10 = "cifar10"  # CIFAR-10 python pickle batches
    cifar100 = "cifar100"  # CIFAR-100 python pickle files
    folder = "folder"  # image-folder tree: ROOT/[split/]class/image.png
    npz = "npz"  # generated images: arrays `image` (N,H,W,C uint8) and `label`


@dataclass(frozen=True)
class PrepareConfig:
    source: str = "data/fashion-mnist"
    format: SourceFormat = SourceFormat.auto
    out: str = "artifacts/shards/real"
    name: str = ""  # key prefix; empty: derived from the source folder name
    shard_size: int = 10_000  # samples per tar shard
    limit: int = 0  # keep the first N samples of each split (0: all)


@dataclass(frozen=True)
class ViewSpec:
    """The augmentation family whose parameters each cached view records.

    A view is a random crop of the zero-padded image (offsets dx, dy in [0, 2*pad]) followed by
    an optional horizontal flip. dx = dy = pad, flip = 0 is the identity.
    """

    pad: int = 2
    flip: bool = True

    # the cache records dx, dy as int8 (offsets 0..2*pad): a larger pad would wrap around
    MAX_PAD = 63

    def check(self) -> None:
        if not 0 <= self.pad <= self.MAX_PAD:
            raise UserError(f"--view-pad must be in [0, {self.MAX_PAD}] (crop offsets 0..2*pad are stored as "
                            f"int8), got {self.pad}")

    def to_dict(self) -> dict:
        return {"kind": "pad-crop-flip", "pad": self.pad, "flip": self.flip, "fill": 0}


# --- diffusion (stage `diffusion`) -------------------------------------------------------------
@dataclass(frozen=True)
class DiffusionConfig:
    shards: str = "artifacts/shards/real/train"
    out: str = "artifacts/diffusion"
    model: str = ""  # an existing diffusers UNet2DModel (folder or hub id): use it, do not train
    block_channels: tuple[int, ...] = (32, 64, 64)
    layers_per_block: int = 1
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    class_dropout: float = 0.1  # label dropout: the null class is index num_classes
    steps: int = 600  # ~6.5 min on 2 CPU cores (bf16); the GPU setting: stages/diffusion.py
    batch_size: int = 128
    lr: float = 5e-4
    warmup_steps: int = 100  # linear warm-up, then cosine decay to 10% of lr
    attention: bool = False  # self-attention at the lowest resolution (slow on CPU)
    limit: int = 0  # train on the first N real images (0: all)
    ema_decay: float = 0.999
    bf16: bool = True  # autocast on CPUs with AMX / on GPUs
    checkpoint_every: int = 100
    seed: int = 0


# --- generate (stage `generate`) ---------------------------------------------------------------
@dataclass(frozen=True)
class GenerateConfig:
    model: str = "artifacts/diffusion"
    real: str = "artifacts/shards/real/train"  # for the pseudo-labeller of unconditional models
    out: str = "artifacts/shards/synthetic"
    n: int = 3000
    sampler: str = "ddim"  # ddim | dpm
    sample_steps: int = 20
    eta: float = 1.0  # DDIM noise: 1 ancestral (robust for a briefly trained model), 0 deterministic ODE
    guidance: float = 1.0  # classifier-free guidance scale (1.0: none)
    min_confidence: float = 0.9  # pseudo-label filter for unconditional models
    batch_size: int = 250
    shard_size: int = 10_000
    bf16: bool = True  # autocast for the UNet forward (CPUs with bf16 support / GPUs)
    check: bool = True  # agreement of a real-data classifier with the intended labels
    real_test: str = "artifacts/shards/real/test"  # the check classifier's test accuracy ("" skips)
    classifier_epochs: int = 2  # the standard classifier (pseudo-labels and the check)
    classifier_limit: int = 20_000  # train it on the first N real images (0: all)
    classifier_nuisance: bool = True  # train it with random background level + pixel noise (judge shapes)
    seed: int = 0


# --- extract (stage one) -----------------------------------------------------------------------
@dataclass(frozen=True)
class ExtractConfig:
    model: str = "artifacts/diffusion"
    real: str = "artifacts/shards/real"  # folder with one sub-folder of shards per split
    synthetic: str = "artifacts/shards/synthetic"  # "" for none
    out: str = "artifacts/feats.zarr"
    t: int = 100
    layer: str = "mid_block"
    pooling: str = "mean"  # mean | flatten
    views: int = 4  # K for the real train part (view 0 is the identity)
    views_synthetic: int = 4  # K of the synthetic part: augmented like the real one (DM-AT does)
    draws: int = 1  # noise draws averaged per view
    condition: str = "null"  # null | label | none  (class conditioning used while extracting)
    view: ViewSpec = field(default_factory=ViewSpec)
    batch_size: int = 256
    rows_per_chunk: int = 256  # samples per zarr chunk (the reader's unit of I/O)
    chunks_per_shard: int = 16  # chunks per zarr shard (the writer's and resume unit)
    compressor: str = "blosc-zstd"  # blosc-zstd | blosc-lz4 | zstd (see pipeline/cache.py)
    limit: int = 0  # first N samples of each part (0: all)
    seed: int = 0


# --- train (stage two) -------------------------------------------------------------------------
@dataclass(frozen=True)
class TrainConfig:
    cache: str = "artifacts/feats.zarr"
    out: str = "artifacts/train/default"
    real_shards: str = ""  # "": the real train shard folder the cache records
    synthetic_shards: str = ""  # "": the synthetic shard folder the cache records
    arch: str = "cnn"
    method: str = "pgd"  # pgd | trades
    eps: float = 0.1
    attack_steps: int = 5
    step_size: float = 0.03
    trades_beta: float = 6.0
    dra_weight: float = 0.5  # 0: plain adversarial training
    dra_schedule: str = "constant"  # constant | linear-warmup | cosine-decay
    head_hidden: int = 256
    target_norm: str = "center"  # none | center | whiten (with the cache's train mean/std)
    synthetic_fraction: float = 0.0  # exact per-batch share of synthetic samples (DM-AT: 0.7)
    real_limit: int = 10_000  # train on the first N real samples of the cache (0: all)
    epochs: int = 4  # passes over the real samples
    max_steps: int = 0  # stop after this many steps (0: epochs x steps per epoch); equal budgets across variants
    batch_size: int = 128  # global batch (split over processes)
    lr: float = 0.2  # measured: 0.2 beats 0.05 (62% vs 51% clean, 44% vs 36% PGD-10) after 156 steps
    momentum: float = 0.9
    weight_decay: float = 5e-4
    lr_schedule: str = "cosine"  # cosine | onecycle
    label_smoothing: float = 0.1
    ema_decay: float = 0.995
    image_size: int = 0  # 0: the cache's; otherwise a cache of another size is refused
    view: ViewSpec = field(default_factory=ViewSpec)  # must equal the cache's augmentation spec
    memory_budget_mb: int = 2048  # the target reader streams chunks above this (0: always stream)
    checkpoint_every: int = 0  # steps between mid-epoch checkpoints (0: end of each epoch only)
    online: bool = False  # compute targets with the diffusion model inside the step
    resume: bool = False
    verify: bool = True  # checksums + NaN/Inf scan of the cache parts read, before training (off: trust the store)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0


# --- bench (not a DVC stage: `python -m pipeline bench`) -----------------------------------------
@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the benchmark; the defaults run in a few minutes on 2 CPU cores."""

    source: str = "data/fashion-mnist"  # real images (prepared into a temporary folder)
    out: str = "artifacts/bench/bench.json"
    n: int = 2048  # real images of each split (train, test) that extract and training use
    views: int = 4  # K of the train part
    t: int = 100
    layer: str = "mid_block"
    batch_size: int = 256  # extract batch, and the bare forward's
    chunks_per_shard: int = 4  # extract's zarr shards (several per part, so 2 processes share the work)
    repeats: int = 5  # interleaved repeats of extract vs the bare forward (memory children: 2, 2-process runs: 2)
    train_steps: int = 40  # timed steps of each training variant, interleaved step by step
    train_batch_size: int = 128
    attack_steps: int = 5
    arch: str = "cnn"
    online_full: bool = True  # also time online DRA with the whole UNet forward (as the paper runs it)
    memory_budget_mb: int = 64  # the reader's budget for the flat-memory check
    stream_cache_mb: int = 400  # raw size of the synthetic store read under that budget (and one half as big)
    two_proc: bool = True  # time extract with 2 processes vs 1 (accelerate launch)
    workdir: str = ""  # scratch folder ("" : a temporary one, removed afterwards)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0


# --- evaluate ----------------------------------------------------------------------------------
class AutoAttackVersion(str, Enum):
    """Which AutoAttack runs (pipeline/robust.py documents the subsets)."""

    standard = "standard"  # apgd-ce, apgd-t, fab-t, square: the reference evaluation
    fast = "fast"  # apgd-ce (1 restart) + apgd-t (fast_targets classes): a cheaper CPU subset
    none = "none"


@dataclass(frozen=True)
class EvaluateConfig:
    checkpoint: str = "artifacts/train/default"
    shards: str = "artifacts/shards/real/test"
    out: str = "artifacts/eval/default.json"  # the full result (attacks, checks, timings)
    metrics: str = ""  # flat {clean, pgd, autoattack} JSON for `dvc metrics`; "": OUT with .metrics.json
    name: str = ""  # variant label recorded in the result; "": the checkpoint folder's name
    n: int = 1000  # the first N test images
    eps: float = 0.1  # Linf budget (Fashion-MNIST convention; CIFAR: 8/255)
    pgd_steps: int = 20
    pgd_restarts: int = 2
    pgd_step_size: float = 0.0  # 0: 2.5 * eps / steps (Madry et al.)
    autoattack: AutoAttackVersion = AutoAttackVersion.fast
    fast_targets: int = 3  # target classes of apgd-t in the fast subset (standard: 9)
    fast_iters: int = 100  # iterations of each APGD attack in the fast subset (standard: 100)
    check_n: int = 100  # images used by the model checks and the large-eps check
    batch_size: int = 250
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0


# --- report ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ReportConfig:
    evals: str = "artifacts/eval"
    train: str = "artifacts/train"
    grid: str = "artifacts/shards/synthetic/grid.png"
    out: str = "artifacts/report"
    allow_unequal_budgets: bool = False  # show variants trained at other budgets (marked) instead of refusing
    readme: str = ""  # also write the table into this file between <!-- report:begin/end --> lines

"""Everything `train` sets up before its first step, and the step itself (``Trainer``).

``setup(cfg)`` validates the flags, opens the cache (refusing incomplete or damaged stores and
any mismatch with the image shards), attaches the target reader (in RAM or streamed), builds the
classifier + projection head + optimizer + EMA and the sampler, without writing anything.
``Trainer.step`` runs one adversarial step: recorded views replayed, PGD on top, AT loss +
lambda * DRA loss against the cached (or, ``--online``, freshly computed) targets.
The stage recipe (``stages/train.py``) adds the epochs, checkpoints and resume; the benchmark
times ``Trainer.step`` directly.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from pipeline.cache import open_cache, verify_cache
from pipeline.config import TrainConfig
from pipeline.errors import UserError, check_out, refuse_non_finite
from pipeline.models import CLASSIFIERS, ProjectionHead, build_classifier
from pipeline.runtime import Runtime
from pipeline.sampler import MixedSampler, Prefetcher
from pipeline.train_data import PartData, assemble, attach_reader, feature_bytes, load_part
from pipeline.training import (
    EMA,
    DRANet,
    DRASchedule,
    LRSchedule,
    Method,
    StepSettings,
    TargetNorm,
    adversarial_step,
    clean_accuracy,
    dra_weight_at,
    lr_at,
    normalise_targets,
)

WINDOW = 4  # chunks per shuffle window when streaming
CLEAN_EVERY = 10  # clean accuracy (an extra eval forward) is measured on every 10th step


@dataclass(frozen=True)
class Parsed:
    method: Method
    lr_schedule: LRSchedule
    dra_schedule: DRASchedule
    target_norm: TargetNorm


def _enum(cls: type, value: str, flag: str) -> Any:
    try:
        return cls(value)
    except ValueError:
        raise UserError(f"--{flag} {value!r}: choose one of {', '.join(m.value for m in cls)}") from None


def check_config(cfg: TrainConfig) -> Parsed:
    """Every flag checked before any file is opened."""
    refuse_non_finite(cfg)
    if cfg.arch not in CLASSIFIERS:
        raise UserError(f"--arch {cfg.arch!r}: choose one of {', '.join(CLASSIFIERS)}")
    checks = [(cfg.epochs >= 1, "--epochs must be >= 1"), (cfg.batch_size >= 2, "--batch-size must be >= 2"),
              (cfg.eps >= 0 and cfg.step_size >= 0, "--eps and --step-size must be >= 0"),
              (cfg.attack_steps >= 0, "--attack-steps must be >= 0"), (cfg.lr > 0, "--lr must be > 0"),
              (cfg.dra_weight >= 0, "--dra-weight must be >= 0"), (cfg.real_limit >= 0, "--real-limit must be >= 0"),
              (0 <= cfg.synthetic_fraction < 1, "--synthetic-fraction must be in [0, 1)"),
              (0 <= cfg.ema_decay < 1, "--ema-decay must be in [0, 1)"), (cfg.head_hidden >= 1, "--head-hidden must be >= 1"),
              (cfg.memory_budget_mb >= 0, "--memory-budget-mb must be >= 0"), (cfg.image_size >= 0, "--image-size must be >= 0"),
              (cfg.checkpoint_every >= 0, "--checkpoint-every must be >= 0"),
              (cfg.max_steps >= 0, "--max-steps must be >= 0"), (bool(cfg.out), "--out is empty"),
              (cfg.trades_beta >= 0, "--trades-beta must be >= 0"), (cfg.weight_decay >= 0, "--weight-decay must be >= 0"),
              (0 <= cfg.momentum < 1, "--momentum must be in [0, 1)"),
              (0 <= cfg.label_smoothing < 1, "--label-smoothing must be in [0, 1)")]
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)
    cfg.view.check()
    check_out(cfg.out, folder=True)
    return Parsed(_enum(Method, cfg.method, "method"), _enum(LRSchedule, cfg.lr_schedule, "lr-schedule"),
                  _enum(DRASchedule, cfg.dra_schedule, "dra-schedule"), _enum(TargetNorm, cfg.target_norm, "target-norm"))


@dataclass
class Data:
    cache: Any
    real: PartData
    synthetic: PartData | None
    mean: torch.Tensor
    std: torch.Tensor
    pad: int
    mode: str  # ram | stream | online | none
    chunked: dict = field(default_factory=dict)


def refuse_damaged(cfg: TrainConfig) -> None:
    """Checksums of every file of the parts train reads, and a NaN/Inf scan of their features.

    A flipped byte can decode to plausible numbers and a truncated zarr shard can read back as
    fill values: without this, training would run on wrong targets without a word.
    """
    parts = ("train", "synthetic") if cfg.synthetic_fraction > 0 else ("train",)
    problems = verify_cache(cfg.cache, parts=parts)
    if problems:
        more = f" (and {len(problems) - 1} more; run `python -m pipeline cache verify`)" if len(problems) > 1 else ""
        first = " ".join(problems[0].split())
        raise UserError(f"{cfg.cache}: damaged cache refused before training: {first}{more}")


def open_data(cfg: TrainConfig, rt: Runtime) -> Data:
    """Cache + images, all checks done; features in RAM or streamed (or none: plain AT / online)."""
    cache = open_cache(cfg.cache)
    if cfg.verify:
        refuse_damaged(cfg)
    if "train" not in cache.parts:
        raise UserError(f"{cfg.cache}: no real train part")
    if cfg.synthetic_fraction > 0 and "synthetic" not in cache.parts:
        raise UserError(f"{cfg.cache}: --synthetic-fraction {cfg.synthetic_fraction} needs a synthetic part")
    kw = dict(view_spec=cfg.view.to_dict(), image_size=cfg.image_size or None)
    real, rpart = load_part(cache, "train", shards_dir=cfg.real_shards, limit=cfg.real_limit, **kw)
    syn = spart = None
    if cfg.synthetic_fraction > 0:
        syn, spart = load_part(cache, "synthetic", shards_dir=cfg.synthetic_shards, limit=0, **kw)
    mode = "none" if cfg.dra_weight == 0 else "online" if cfg.online else "ram"
    chunked = {}
    if mode == "ram":
        used = feature_bytes(rpart, real.n) + (feature_bytes(spart, syn.n) if syn else 0)
        mode = "stream" if used > cfg.memory_budget_mb * 2**20 or cfg.memory_budget_mb == 0 else "ram"
        for d, p in ((real, rpart), (syn, spart)):
            if d is not None:
                attach_reader(d, p, stream=mode == "stream", window=WINDOW)
                chunked[d.name] = p.rows_per_chunk if mode == "stream" else 0
    mean, std = (torch.from_numpy(rpart.mean).float(), torch.from_numpy(rpart.std).float())
    return Data(cache, real, syn, mean.to(rt.device), std.to(rt.device), int(cache.attrs["view_spec"]["pad"]),
                mode, chunked)


def build(cfg: TrainConfig, data: Data, rt: Runtime) -> tuple[DRANet, torch.optim.Optimizer, EMA, dict]:
    torch.manual_seed(cfg.seed)
    _, c, h, _ = data.real.images.shape
    num_classes = int(data.cache.part("train").fingerprint.get("num_classes") or int(data.real.labels.max()) + 1)
    clf = build_classifier(cfg.arch, c, num_classes, h)
    head = ProjectionHead(clf.feature_dim, cfg.head_hidden, data.cache.part("train").d) if cfg.dra_weight > 0 else None
    net = DRANet(clf, head).to(rt.device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    meta = {"arch": cfg.arch, "in_channels": c, "num_classes": num_classes, "image_size": h,
            "feature_dim": clf.feature_dim, "train": json.loads(json.dumps(asdict(cfg))),
            "cache": {k: data.cache.attrs.get(k) for k in ("model", "t", "layer", "pooling", "condition", "digest")} |
            {"url": cfg.cache, "target_mode": data.mode}}
    return net, opt, EMA(clf, cfg.ema_decay), meta


def make_sampler(cfg: TrainConfig, data: Data, rt: Runtime) -> MixedSampler:
    syn = data.synthetic
    try:
        return MixedSampler(n_real=data.real.n, k_real=data.real.k, batch_size=cfg.batch_size, seed=cfg.seed,
                            n_syn=syn.n if syn else 0, k_syn=syn.k if syn else 1,
                            synthetic_fraction=cfg.synthetic_fraction, rank=rt.rank, world=rt.world,
                            chunk_real=data.chunked.get("train", 0), chunk_syn=data.chunked.get("synthetic", 0),
                            window=WINDOW)
    except ValueError as exc:
        raise UserError(str(exc)) from None


def targets_for(inputs: dict, data: Data, extractor: Any, norm: TargetNorm, device: torch.device) -> torch.Tensor | None:
    """The batch's targets in the loss's space: cached rows, or recomputed online from the same view and seed."""
    if data.mode == "none":
        return None
    if data.mode == "online":
        raw = extractor(inputs["x"], inputs["seed"], inputs["y"])
    else:
        raw = inputs["target"]
    return normalise_targets(raw.to(device), data.mean, data.std, norm)


@dataclass
class Trainer:
    """Everything one run holds; ``step`` is one optimisation step (used by ``run`` and ``bench``)."""

    cfg: TrainConfig
    parsed: Parsed
    rt: Runtime
    data: Data
    net: DRANet
    wrapped: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: EMA
    gen: torch.Generator
    sampler: MixedSampler
    meta: dict
    extractor: Any = None

    @property
    def total_steps(self) -> int:
        full = self.cfg.epochs * self.sampler.steps_per_epoch
        return min(full, self.cfg.max_steps) if self.cfg.max_steps else full

    def feed(self, epoch: int, start: int) -> Prefetcher:
        """Assembled inputs of the epoch's batches, prepared one or two steps ahead in a thread."""
        d = self.data
        return Prefetcher(self.sampler.batches(epoch, start), lambda b: assemble(b, d.real, d.synthetic, d.pad), 2)

    def step(self, global_step: int, batch: Any, inputs: dict) -> tuple[dict, float, float]:
        """One step: lr/DRA weight for this step, targets, attack, loss, update, EMA. Returns stats."""
        cfg, rt = self.cfg, self.rt
        lr = lr_at(global_step, self.total_steps, cfg.lr, self.parsed.lr_schedule)
        for group in self.opt.param_groups:
            group["lr"] = lr
        dra_w = dra_weight_at(global_step, self.total_steps, cfg.dra_weight, self.parsed.dra_schedule)
        x, y = inputs["x"].to(rt.device), inputs["y"].to(rt.device)
        with rt.autocast():
            target = targets_for(inputs, self.data, self.extractor, self.parsed.target_norm, rt.device)
            settings = StepSettings(self.parsed.method, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.trades_beta,
                                    cfg.label_smoothing)
            loss, terms, logits_adv = adversarial_step(self.wrapped, self.net.classifier, x, y, target, dra_w,
                                                       settings, self.gen)
        self.opt.zero_grad(set_to_none=True)
        rt.backward(loss)
        self.opt.step()
        self.ema.update(self.net.classifier, global_step)
        stats = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                 "adv_acc": (logits_adv.argmax(1) == y).float().mean()}
        if batch.step % CLEAN_EVERY == 0:
            stats["clean_acc"] = clean_accuracy(self.net.classifier, x, y)
        return stats, lr, dra_w


def setup(cfg: TrainConfig) -> Trainer:
    """Checks, data, model, optimizer: everything before the first step (no files written)."""
    parsed = check_config(cfg)
    rt = Runtime(cfg.device)
    data = open_data(cfg, rt)
    extractor = None
    if data.mode == "online":
        from pipeline.features import FeatureExtractor  # lazy: only the online mode loads the diffusion model

        extractor = FeatureExtractor.from_cache(data.cache, device=rt.device)
    net, opt, ema, meta = build(cfg, data, rt)
    sampler = make_sampler(cfg, data, rt)
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed * 1000003 + rt.rank)
    return Trainer(cfg, parsed, rt, data, net, net, opt, ema, gen, sampler, meta, extractor)

"""Training as one unit: ``Trainer.create(cfg)`` builds a complete run, ``fit`` trains it.

``create`` validates the flags, opens the cache (refusing incomplete or damaged stores and any
mismatch with the image shards), joins the images by key, attaches the target readers (in RAM or
streamed), builds classifier + projection head + SGD + EMA and the sampler, and restores a
checkpoint (``--resume``), without writing anything. ``step`` runs one adversarial step: recorded
views replayed, PGD on top, AT loss + lambda * DRA loss against the cached (or, ``--online``,
freshly computed) targets. ``fit`` runs the epochs with checkpoints (``pipeline/train/state.py``);
the benchmark times ``step`` directly. The parts: ``sampler`` (which (row, view) pairs a batch
holds), ``data`` (images + targets for them), ``step`` (the loss and its schedules), ``state``
(checkpoints and the log).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from pipeline.cache.contract import NORMALISATION
from pipeline.cache.store import FeatureCache, StoreChanged, open_cache, recheck_cache, verify_cache
from pipeline.cache.targets import TargetSpec
from pipeline.classifiers.zoo import build_classifier
from pipeline.core.errors import UserError, check_out
from pipeline.core.runtime import peak_rss_mb
from pipeline.core.views import ViewSpec
from pipeline.train import state
from pipeline.train.config import TargetNorm, TrainConfig
from pipeline.train.data import (
    WINDOW,
    PartData,
    assemble,
    image_note,
    load_part,
    plan_memory,
    target_reader,
    target_whitening,
    unaugmented,
)
from pipeline.train.livelog import LiveLog
from pipeline.train.model import EMA, DRANet, backbone_parameters, build_dra_net
from pipeline.train.readers import Prefetcher
from pipeline.train.runtime import Runtime
from pipeline.train.sampler import MixedSampler
from pipeline.train.schedules import dra_weight_at, lr_at
from pipeline.train.state import RunState, Weights
from pipeline.train.step import (
    StepSettings,
    adversarial_step,
    clean_accuracy,
    normalise_targets,
)
from pipeline.train.validation import Validation, is_best, measure, save_best, validation_set

CLEAN_EVERY = 10  # clean accuracy (an extra eval forward) is measured on every 10th step


def check_config(cfg: TrainConfig) -> None:
    """Every flag checked before any file is opened."""
    cfg.validate()
    check_out(cfg.out, folder=True)
    state.refuse_replacing(Path(cfg.out), resume=cfg.resume, overwrite=cfg.overwrite)


@dataclass
class Data:
    cache: FeatureCache
    target: TargetSpec  # the cache's target set this run aligns to
    real: PartData
    synthetic: PartData | None
    mean: torch.Tensor
    std: torch.Tensor
    pad: int
    mode: str  # targets: ram | stream | online | none
    chunked: dict = field(default_factory=dict)  # part -> rows per chunk of the chunk-aware order (streaming)
    images: str = "ram"  # ram | stream (read from the cache with the targets) | mixed (a part without stored images)
    view: ViewSpec = field(default_factory=ViewSpec)  # the cache's augmentation (--fresh-views draws from it)
    whitening: torch.Tensor | None = None  # --target-norm pca: the train targets' whitening (C x C)


def parts_read(cfg: TrainConfig) -> tuple[str, ...]:
    """The cache parts a training reads."""
    return ("train", "synthetic") if cfg.synthetic_fraction > 0 else ("train",)


def refuse_damaged(cfg: TrainConfig) -> None:
    """Checksums of every file of the parts train reads, and a NaN/Inf scan of their features.

    A flipped byte can decode to plausible numbers and a truncated zarr shard can read back as
    fill values: without this, training would run on wrong targets without a word.
    """
    problems = verify_cache(cfg.cache, parts=parts_read(cfg))
    if problems:
        more = f" (and {len(problems) - 1} more; run `python -m pipeline cache verify`)" if len(problems) > 1 else ""
        first = " ".join(problems[0].split())
        raise UserError(f"{cfg.cache}: damaged cache refused before training: {first}{more}")


def open_data(cfg: TrainConfig, rt: Runtime) -> Data:
    """Cache + images, all checks done; features in RAM or streamed (or none: plain AT / online)."""
    cache = open_cache(cfg.cache)
    if cfg.cache_digest and cache.digest != cfg.cache_digest:
        raise UserError(f"{cfg.cache}: digest {cache.digest[:16]}... is not the --cache-digest "
                        f"{cfg.cache_digest[:16]}... you were given: another or a changed store; refused")
    if cfg.verify:
        refuse_damaged(cfg)
    if "train" not in cache.parts:
        raise UserError(f"{cfg.cache}: no real train part")
    if cfg.synthetic_fraction > 0 and "synthetic" not in cache.parts:
        raise UserError(f"{cfg.cache}: --synthetic-fraction {cfg.synthetic_fraction} needs a synthetic part")
    target = cache.target(cfg.t, cfg.layer)
    mode = "none" if cfg.dra_weight == 0 else "online" if cfg.online else "ram"
    limits = {"train": (cfg.real_limit, cfg.real_shards)}
    if cfg.synthetic_fraction > 0:
        limits["synthetic"] = (0, cfg.synthetic_shards)
    used = {}
    for name, (limit, _) in limits.items():
        p = cache.part(name, target)
        used[name] = (p, p.n if limit <= 0 else min(limit, p.n))
    # over the budget, everything streams: images (from the cache) and features, in the chunk-aware order
    stream, notes = plan_memory(used, features=mode == "ram", budget_mb=cfg.memory_budget_mb)
    for note in notes if rt.is_main else []:
        print(note)
    kw = dict(view_spec=cfg.view.given(), image_size=cfg.image_size or None, target=target, verify=cfg.verify)
    parts: dict[str, PartData] = {}
    for name, (limit, shards) in limits.items():
        p = used[name][0]
        d, _ = load_part(cache, name, shards_dir=shards, limit=limit, stream=stream, **kw)
        note = image_note(name, d, cache.digest)
        if note and rt.is_main and not (cfg.cache_digest and cfg.verify):  # a trusted digest vouches for them
            print(note)
        if mode == "ram":
            d = replace(d, reader=target_reader(p, d.n, stream=stream))
        parts[name] = d if cfg.augment else unaugmented(d, cache.plan.view_spec.pad)
    if mode == "ram" and stream:
        mode = "stream"
    # ONE sample order whatever the memory mode: chunk-aware by the cache's chunking, in RAM or
    # streamed, so runs of one comparison (AT streams nothing, AT+DRA may) see the same batches
    chunked = {name: used[name][0].rows_per_chunk for name in parts}
    streamed = [stream and used[name][0].has_images for name in parts]
    images = "stream" if all(streamed) else "mixed" if any(streamed) else "ram"
    rpart = used["train"][0]
    mean, std = (torch.from_numpy(rpart.mean).float(), torch.from_numpy(rpart.std).float())
    view = cache.plan.view_spec  # the cache's (open_cache checked it)
    whitening = None
    if cfg.target_norm is TargetNorm.pca and mode != "none":
        whitening = target_whitening(rpart, used["train"][1]).to(rt.device)
    return Data(cache, target, parts["train"], parts.get("synthetic"), mean.to(rt.device), std.to(rt.device),
                view.pad, mode, chunked, images, view, whitening)


def build_model(cfg: TrainConfig, data: Data, rt: Runtime) -> tuple[DRANet, Weights, dict]:
    """Classifier (+ DRA head), SGD, EMA and the attack's generator, seeded; the run's metadata."""
    torch.manual_seed(cfg.seed)
    c, h, _ = data.real.image_shape
    num_classes = int(data.cache.part("train").fingerprint.num_classes or int(data.real.labels.max()) + 1)
    clf = build_classifier(cfg.arch, c, num_classes, h)
    net = build_dra_net(clf, data.target if cfg.dra_weight > 0 else None, cfg.head_hidden, cfg.align_layer,
                        in_channels=c, image_size=h).to(rt.device)
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    gen = torch.Generator(device=rt.device).manual_seed(cfg.seed * 1000003 + rt.rank)
    plan = data.cache.plan
    meta = {"arch": cfg.arch.value, "in_channels": c, "num_classes": num_classes, "image_size": h,
            # what training used, read from the cache (the flags above may leave them unset)
            "view_spec": data.view.to_dict(), "normalisation": NORMALISATION,
            "threat_model": "Linf", "eps": cfg.eps,
            # the sample order (report refuses to pair runs whose orders differ)
            "order": {"mode": "chunk-aware", "window": WINDOW, "rows_per_chunk": data.chunked},
            "feature_dim": clf.feature_dim, "train": json.loads(json.dumps(asdict(cfg))),
            # content hash of each image split -> its first rows used in training (evaluate refuses them)
            "trained_on": trained_on(data),
            "cache": {"model": plan.model.to_attrs(), "pooling": plan.pooling.value, "condition": plan.condition,
                      "digest": data.cache.digest} |
            {"t": data.target.t, "layer": data.target.layer, "target_set": data.target.name, "url": cfg.cache,
             "target_shape": list(data.target.shape),  # what the DRA head outputs (api.load_classifier rebuilds it)
             "target_mode": data.mode, "image_mode": data.images,
             # how each part's images were checked: split | store (manifest + digest only) | shards | off
             "image_check": {d.name: d.image_check for d in (data.real, data.synthetic) if d is not None},
             "probe_accuracy": probe_of(data.cache.meta.probe, data.target)}}
    return net, Weights(net, opt, EMA(clf, cfg.ema_decay), gen), meta


def probe_of(probe: dict | None, target: TargetSpec) -> float | None:
    """The cache's linear-probe accuracy of the target set training aligns to (None if not recorded)."""
    sets = probe.get("sets") if isinstance(probe, dict) else None
    for s in sets if isinstance(sets, list) else []:
        if isinstance(s, dict) and s.get("t") == target.t and s.get("layer") == target.layer:
            acc = s.get("probe_accuracy")
            return float(acc) if isinstance(acc, (int, float)) and not isinstance(acc, bool) else None
    return None


def trained_on(data: Data) -> dict[str, int]:
    """Content hash of each image split -> how many of its first rows training used (evaluate refuses
    them). A part without a content hash is left out; two parts of the same images keep the larger."""
    out: dict[str, int] = {}
    for d, name in ((data.real, "train"), (data.synthetic, "synthetic")):
        h = data.cache.part(name).fingerprint.content_hash if d else None
        if isinstance(h, str):
            out[h] = max(out.get(h, 0), int(d.n))
    return out


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
    """The batch's targets in the loss's space, flattened to (B, size): cached rows, or recomputed
    online from the same view and seed."""
    if data.mode == "none":
        return None
    if data.mode == "online":
        raw = extractor(inputs["x"], inputs["seed"], inputs["y"])
    else:
        raw = inputs["target"]
    return TargetSpec.flat(normalise_targets(raw.to(device), data.mean, data.std, norm, data.whitening))


@dataclass(frozen=True)
class Trainer:
    """One run, built complete by ``create``; ``fit`` trains, ``save`` checkpoints, ``step`` is one
    optimisation step (the benchmark times it directly). ``run`` is the progress, the only part
    that changes."""

    cfg: TrainConfig
    rt: Runtime
    data: Data
    net: DRANet
    wrapped: torch.nn.Module  # the module the loss forward goes through (DDP-wrapped with >1 process)
    weights: Weights
    sampler: MixedSampler
    meta: dict
    run: RunState
    extractor: Any = None  # --online: the diffusion model inside the step
    val: Validation | None = None  # --val-n: the held-out rows measured after every epoch

    @classmethod
    def create(cls, cfg: TrainConfig) -> Trainer:
        """Checks, data, model, optimizer, a restored checkpoint (--resume): nothing written."""
        check_config(cfg)
        rt = Runtime(cfg.device)
        data = open_data(cfg, rt)
        extractor = None
        if data.mode == "online":
            from pipeline.cache.extractor import (
                FeatureExtractor,  # lazy: only the online mode loads the model
            )

            extractor = FeatureExtractor.from_cache(data.cache, data.target, device=rt.device)
        net, weights, meta = build_model(cfg, data, rt)
        sampler = make_sampler(cfg, data, rt)
        run = RunState()
        if cfg.resume:  # before the DDP wrap: the restored weights are what every process starts from
            run = state.load(Path(cfg.out), cfg=cfg, weights=weights, device=rt.device,
                             cache_digest=meta["cache"]["digest"]) or run
        val = validation_set(data.cache.part("train", data.target), data.real.n, cfg.val_n)
        return cls(cfg, rt, data, net, rt.prepare(net), weights, sampler, meta, run, extractor, val)

    @property
    def total_steps(self) -> int:
        full = self.cfg.epochs * self.sampler.steps_per_epoch
        return min(full, self.cfg.max_steps) if self.cfg.max_steps else full

    def feed(self, epoch: int, start: int) -> Prefetcher:
        """Assembled inputs of the epoch's batches, prepared one or two steps ahead in a thread."""
        d = self.data
        fresh = (d.view, self.cfg.seed * 1000003 + self.rt.rank) if self.cfg.fresh_views else None
        return Prefetcher(self.sampler.batches(epoch, start),
                          lambda b: assemble(b, d.real, d.synthetic, d.pad, fresh), 2)

    def step(self, global_step: int, batch: Any, inputs: dict) -> tuple[dict, float, float]:
        """One step: lr/DRA weight for this step, targets, attack, loss, update, EMA. Returns stats."""
        cfg, rt = self.cfg, self.rt
        lr = lr_at(global_step, self.total_steps, cfg.lr, cfg.lr_schedule)
        for group in self.weights.opt.param_groups:
            group["lr"] = lr
        dra_w = dra_weight_at(global_step, self.total_steps, cfg.dra_weight, cfg.dra_schedule)
        x, y = inputs["x"].to(rt.device), inputs["y"].to(rt.device)
        with rt.autocast():
            target = targets_for(inputs, self.data, self.extractor, cfg.target_norm, rt.device)
            settings = StepSettings(cfg.method, cfg.eps, cfg.step_size, cfg.attack_steps, cfg.trades_beta,
                                    cfg.label_smoothing, cfg.align_input)
            # the DRA term's share of the backbone gradient, on one batch every --dra-grad-every steps
            share = cfg.dra_grad_every and batch.step % cfg.dra_grad_every == 0
            loss, terms, logits_adv = adversarial_step(self.wrapped, self.net.classifier, x, y, target, dra_w,
                                                       settings, self.weights.gen,
                                                       backbone_parameters(self.net.classifier) if share else None)
        self.weights.opt.zero_grad(set_to_none=True)
        rt.backward(loss)
        self.weights.opt.step()
        self.weights.ema.update(self.net.classifier, global_step)
        stats = {"loss": loss.detach(), **{k: v.detach() for k, v in terms.items()},
                 "adv_acc": (logits_adv.argmax(1) == y).float().mean()}
        if batch.step % CLEAN_EVERY == 0:
            stats["clean_acc"] = clean_accuracy(self.net.classifier, x, y)
        return stats, lr, dra_w

    @property
    def streams(self) -> bool:
        """Reads the cache during training (targets or images), not only before the first step."""
        return self.data.mode == "stream" or self.data.images != "ram"

    def save(self) -> None:
        """A checkpoint. A streaming run first checks that the store is still the one it verified
        (digest, every file of its parts against the manifest): a checkpoint never vouches for steps
        that read a changed store."""
        if self.streams and self.cfg.verify:
            problems = recheck_cache(self.cfg.cache, parts=parts_read(self.cfg), digest=self.meta["cache"]["digest"])
            if problems:
                raise StoreChanged(f"{self.cfg.cache}: {problems[0]} (changed since training started)")
        state.save(Path(self.cfg.out), cfg=self.cfg, weights=self.weights, st=self.run, meta=self.meta, rt=self.rt)

    def fit(self, *, stop_after_steps: int | None = None) -> dict:
        """Epochs of sampled batches -> ``step``; a checkpoint per epoch (and every --checkpoint-every
        steps), metrics.json at the end. ``stop_after_steps`` (tests) checkpoints and returns after
        that many steps, like a kill."""
        cfg, rt, st = self.cfg, self.rt, self.run
        if cfg.overwrite and rt.is_main:
            state.clear(Path(cfg.out))
        st.resume_clock()  # wall time counts from here (plus a resumed run's earlier seconds)
        bar = tqdm(total=self.total_steps, initial=st.global_step, desc=f"train {Path(cfg.out).name}", unit="step",
                   mininterval=2, disable=not rt.is_main)
        live = LiveLog(Path(cfg.out), st.live) if rt.is_main else None  # a resumed run's rows replayed
        try:
            return self._fit(bar, stop_after_steps, live)
        except StoreChanged as exc:
            raise UserError(f"{exc}; training stopped, {cfg.out} keeps its last checkpoint: restore the "
                            "cache and rerun with --resume") from None
        finally:
            bar.close()  # the error line starts a line of its own

    def _fit(self, bar: tqdm, stop_after_steps: int | None, live: LiveLog | None) -> dict:
        cfg, rt, st = self.cfg, self.rt, self.run

        def checkpoint() -> None:
            self.save()
            if live:
                live.sync()

        for epoch in range(st.epoch, cfg.epochs):
            if st.global_step >= self.total_steps:
                break
            feed = self.feed(epoch, st.step)
            self.net.train()
            t_prev = time.perf_counter()
            try:
                for batch, inputs in feed:
                    stats, lr, dra_w = self.step(st.global_step, batch, inputs)
                    now = time.perf_counter()
                    st.add(stats, now - t_prev, lr, dra_w)
                    t_prev = now
                    st.step, st.global_step = batch.step + 1, st.global_step + 1
                    mid_epoch = st.step < self.sampler.steps_per_epoch
                    last = not mid_epoch or st.global_step >= self.total_steps
                    if live and (st.global_step % cfg.log_every == 0 or last):  # every epoch has a row
                        live.log(st.global_step, "train", {**stats, "lr": lr, "dra_weight": dra_w})
                    bar.update(1)
                    if cfg.checkpoint_every and st.global_step % cfg.checkpoint_every == 0 and mid_epoch:
                        checkpoint()
                    if stop_after_steps is not None and st.global_step >= stop_after_steps:
                        checkpoint()
                        return {"stopped_at": st.global_step}
                    if st.global_step >= self.total_steps:  # --max-steps reached mid-epoch
                        break
            finally:
                feed.close()
            row = st.end_epoch(epoch, rt)
            if self.val is not None and ((epoch + 1) % cfg.val_every == 0 or epoch + 1 == cfg.epochs):  # into log.tsv too
                row.update(measure(self.weights.ema.model, self.val, eps=cfg.eps, steps=cfg.val_pgd_steps,
                                   seed=cfg.seed, device=rt.device))
                if rt.is_main and is_best(st.log):
                    save_best(Path(cfg.out), self.weights.ema.model, self.meta, row)
            if live:
                live.log(st.global_step, "epoch", {k: v for k, v in row.items() if k != "step"})
            rss = rt.gather(round(peak_rss_mb()))
            if rt.is_main:
                bar.set_postfix_str(f"{st.summary()} peak_rss_mb={'/'.join(map(str, rss))}")
            checkpoint()
        bar.close()
        budget = {**self.sampler.budget(st.global_step), "steps_per_epoch": self.sampler.steps_per_epoch}
        return state.finish(Path(cfg.out), st=st, meta=self.meta, rt=rt, budget=budget, net=self.net)

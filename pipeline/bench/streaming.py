"""Streaming figures of `python -m pipeline bench`: training with its images read from the cache
(CIFAR-sized parts of ~200k and ~2M rows): peak memory, step time streamed vs in RAM, and the
reader's and the data pipeline's rates."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from pipeline.bench import benchmark as B
from pipeline.bench.config import BenchConfig
from pipeline.bench.measure import ROOT, feed_steps, say, step_fns
from pipeline.train.config import TrainConfig

# --- images streamed with their targets (CIFAR-sized parts of ~200k and ~2M rows) ----------------
IMAGE_SHAPE = (32, 32, 3)  # CIFAR-sized rows
SPLIT_SHARD_ROWS = 8192  # two cache shards (16 chunks of 256 rows each) per split shard


def build_image_store(work: Path, rows: int, *, seed: int, d: int = 64, k: int = 1) -> Path:
    """A complete cache whose train part holds ``rows`` random CIFAR-sized images and random float16
    targets (k views of d numbers), with the fingerprint of their image split.

    No diffusion model and no tar files: the split folder holds only its fingerprint (per-shard
    content hashes of keys, pixels and labels, as ``prepare`` writes them), which is all a training
    process that streams its images from the cache reads of the split. Images are regenerated
    from (seed, shard) wherever they are needed, so nothing of size N is ever held in memory.
    """
    from pipeline.cache.targets import Pooling, TargetSpec
    from pipeline.cache.testing import split_record, write_store
    from pipeline.core.shards import FINGERPRINT, content_hash, make_fingerprint, shard_name
    from pipeline.core.views import ViewSpec

    split, url = work / f"split-{rows}", work / f"images-{rows}.zarr"
    split.mkdir(parents=True, exist_ok=True)
    keys = [f"bench-{i:08d}" for i in range(rows)]
    labels = np.random.default_rng([seed, 1]).integers(0, 10, rows).astype(np.int64)
    bounds = [(a, min(a + SPLIT_SHARD_ROWS, rows)) for a in range(0, rows, SPLIT_SHARD_ROWS)]

    def images(s: int) -> np.ndarray:
        a, b = bounds[s]
        raw = np.random.default_rng([seed, 2, s]).bytes((b - a) * int(np.prod(IMAGE_SHAPE)))
        return np.frombuffer(raw, np.uint8).reshape(b - a, *IMAGE_SHAPE)

    records = [{"name": shard_name(s), "count": b - a, "sha256": "",
                "content": content_hash(keys[a:b], images(s), labels[a:b])} for s, (a, b) in enumerate(bounds)]
    fp = make_fingerprint(keys, list(IMAGE_SHAPE), [str(c) for c in range(10)], records,
                          content_hash(keys, (images(s) for s in range(len(bounds))), labels),
                          source="bench: fingerprint only (no tar files)")
    (split / FINGERPRINT).write_text(json.dumps(fp))
    target = TargetSpec(100, "mid_block", Pooling.mean, (d,))
    rng = np.random.default_rng([seed, 3])

    def image_rows(a: int, b: int) -> np.ndarray:  # a cache shard lies within one split shard
        s = a // SPLIT_SHARD_ROWS
        return images(s)[a - bounds[s][0]:b - bounds[s][0]]

    return Path(write_store(str(url), keys=keys, labels=labels, k=k, targets=[target], split=split_record(str(split), fp),
                            features={target.name: lambda a, b: rng.standard_normal((b - a, k, d), np.float32).astype(np.float16)},
                            images=image_rows, view_spec=ViewSpec(pad=4), seed=seed, rows_per_chunk=256,
                            chunks_per_shard=16))


def _image_train_config(cfg: BenchConfig, url: Path, out: Path, budget_mb: int, verify: bool = True) -> TrainConfig:
    """The store's view spec (pad 4) is read from it, as `train` does."""
    return TrainConfig(cache=str(url), out=str(out), real_limit=0, epochs=1, batch_size=cfg.train_batch_size,
                       attack_steps=cfg.attack_steps, arch=cfg.arch, dra_weight=0.5, memory_budget_mb=budget_mb,
                       device=cfg.device, seed=cfg.seed, verify=verify)


def image_train_child(cfg_json: str, url: str, out: str, budget_mb: int, steps: int) -> None:
    """In a fresh process: `train`'s Trainer on a store (checks, verification, readers) and
    ``steps`` training steps; prints one JSON line with the peak RSS and how the run read its data."""
    from pipeline.train.trainer import Trainer

    cfg = BenchConfig(**json.loads(cfg_json))
    t0 = time.perf_counter()
    tr = Trainer.create(_image_train_config(cfg, Path(url), Path(out), budget_mb))
    setup = time.perf_counter() - t0
    feed = feed_steps(tr)
    tr.net.train()
    t0 = time.perf_counter()
    for _ in range(steps):
        batch, inputs = next(feed)
        tr.step(0, batch, inputs)
    feed.close()
    print(json.dumps({"peak_rss_mb": B.peak_rss_mb(), "setup_s": setup, "step_s": (time.perf_counter() - t0) / steps,
                      "image_mode": tr.data.images, "target_mode": tr.data.mode, "rows": tr.data.real.n}))


def drop_page_cache() -> bool:
    """Ask the kernel to drop clean page-cache pages (root only; False where the machine refuses)."""
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def bench_images(cfg: BenchConfig, work: Path) -> dict:
    """Training with images streamed from the cache: peak RSS of one training process on a small
    and a 10x larger part, step time streamed / in RAM, and the data pipeline's samples/s (images
    and targets read, views replayed) / training samples/s, from a cold page cache where allowed."""
    from pipeline.train.data import assemble
    from pipeline.train.trainer import Trainer

    say(f"building CIFAR-sized stores of {cfg.image_rows_small} and {cfg.image_rows_big} rows")
    small = build_image_store(work, cfg.image_rows_small, seed=cfg.seed)
    big = build_image_store(work, cfg.image_rows_big, seed=cfg.seed)
    cfg_json = json.dumps(cfg.__dict__)  # enums are str subclasses: they serialise as their values

    def child(url: Path, tag: str) -> dict:
        code = (f"import pipeline.bench.streaming as b; b.image_train_child({cfg_json!r}, {str(url)!r}, "
                f"{str(work / ('train-' + tag))!r}, {cfg.memory_budget_mb}, {cfg.image_steps})")
        return B.run_child(code, env={"PYTHONPATH": str(ROOT)})

    say("peak RSS of a training process on each store (fresh processes)")
    runs = {"small": child(small, "small"), "big": child(big, "big")}
    added_mb = (cfg.image_rows_big - cfg.image_rows_small) * int(np.prod(IMAGE_SHAPE)) / 2**20
    say("step time, images streamed vs in RAM (small store, interleaved)")
    base = _image_train_config(cfg, small, work / "train-ratio", 0)
    trainers = {"stream": Trainer.create(base), "ram": Trainer.create(replace(base, memory_budget_mb=1 << 20))}
    steps, feeds = step_fns(trainers)
    try:
        times = B.interleaved(steps, rounds=cfg.train_steps, warmup=2, device=trainers["ram"].rt.device)
    finally:
        for f in feeds.values():
            f.close()
    modes = {name: tr.data.images for name, tr in trainers.items()}
    trainers.clear()  # the in-RAM images go before the big store is read
    s = {name: B.median(v) for name, v in times.items()}
    say("reader and data pipeline over the big store (no model)")
    reader = Trainer.create(_image_train_config(cfg, big, work / "train-reader", 0, verify=False))
    part = reader.data.real
    batches = (b for epoch in itertools.count() for b in reader.sampler.batches(epoch))
    # the reader: images and targets of each batch's rows; the pipeline: `assemble` (views replayed too)
    rates, dropped = {}, True
    for name, fn in (("reader", lambda b: (part.images.get(b.real_rows), part.reader.get(b.real_rows, b.real_views))),
                     ("pipeline", lambda b: assemble(b, part, None, reader.data.pad))):
        dropped = drop_page_cache() and dropped
        t0 = time.perf_counter()
        for _ in range(cfg.image_reader_batches):
            fn(next(batches))
        rates[name] = cfg.image_reader_batches * cfg.train_batch_size / (time.perf_counter() - t0)
    reader_rate = rates["reader"]
    train_rate = cfg.train_batch_size / s["stream"]
    out = {"images_rows_small": cfg.image_rows_small, "images_rows_big": cfg.image_rows_big,
           "images_added_mb": added_mb, "images_disk_mb_big": B.dir_bytes(big / "train" / "images") / 2**20,
           "images_peak_rss_mb_small": runs["small"]["peak_rss_mb"], "images_peak_rss_mb_big": runs["big"]["peak_rss_mb"],
           "images_rss_growth_fraction": (runs["big"]["peak_rss_mb"] - runs["small"]["peak_rss_mb"]) / added_mb,
           "images_setup_s_big": runs["big"]["setup_s"], "images_child_modes": [runs[x]["image_mode"] for x in runs],
           "images_stream_step_s": s["stream"], "images_ram_step_s": s["ram"],
           "images_stream_over_ram": s["stream"] / s["ram"], "images_ratio_modes": modes,
           "images_reader_samples_per_s": reader_rate, "images_train_samples_per_s": train_rate,
           "images_reader_over_train": reader_rate / train_rate, "images_page_cache_dropped": dropped,
           "images_pipeline_samples_per_s": rates["pipeline"], "images_pipeline_over_train": rates["pipeline"] / train_rate,
           "images_method": f"CIFAR-sized random images + float16 targets (K=1, D=64); peak RSS: fresh `train` "
                            f"processes (checks, verification, {cfg.image_steps} AT+DRA steps, budget "
                            f"{cfg.memory_budget_mb} MiB); step time: streamed vs in-RAM images, {cfg.train_steps} "
                            f"interleaved steps on the small store; reader (images + targets of a batch's rows) and "
                            f"pipeline (`assemble`: views replayed too): {cfg.image_reader_batches} batches each of the "
                            f"big store's chunk-aware order"
                            + ("" if dropped else " (page cache not dropped: the machine refused)")}
    for p in (small, big):
        shutil.rmtree(p, ignore_errors=True)
    return out

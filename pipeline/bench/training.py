"""Training figures of `python -m pipeline bench`: step time of plain AT, AT+DRA with cached
(in RAM and streamed) and online targets, the target reader's rate, and the reader's peak memory on
a store larger than its budget (fresh processes)."""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.bench import benchmark as B
from pipeline.bench.config import BenchConfig
from pipeline.bench.measure import ROOT, step_fns
from pipeline.train.config import TrainConfig


def _reader_pass(part: Any, batch_size: int, seed: int) -> Any:
    """A callable reading one epoch of targets (chunk-aware order) through the streaming reader."""
    from pipeline.train.data import WINDOW, target_reader
    from pipeline.train.sampler import MixedSampler

    reader = target_reader(part, part.n, stream=True, window=WINDOW)
    sampler = MixedSampler(n_real=part.n, k_real=part.k, batch_size=batch_size, seed=seed,
                           chunk_real=part.rows_per_chunk, window=WINDOW)
    state = {"epoch": 0, "samples": 0}

    def one_pass() -> None:
        for b in sampler.batches(state["epoch"]):
            reader.get(b.real_rows, b.real_views)
            state["samples"] += len(b.real_rows)
        state["epoch"] += 1

    one_pass.samples_per_pass = sampler.steps_per_epoch * sampler.b_real  # type: ignore[attr-defined]
    return one_pass


def bench_train(cfg: BenchConfig, work: Path, store: Path) -> dict:
    from pipeline.cache.extractor import FeatureExtractor
    from pipeline.cache.store import open_cache
    from pipeline.train.trainer import Trainer

    base = TrainConfig(cache=str(store), out=str(work / "train"), real_limit=0, epochs=1000,
                       batch_size=cfg.train_batch_size, attack_steps=cfg.attack_steps, arch=cfg.arch,
                       device=cfg.device, seed=cfg.seed)
    variants = {"plain": replace(base, dra_weight=0.0), "cached": base,
                "cached_stream": replace(base, memory_budget_mb=0), "online": replace(base, online=True)}
    if cfg.online_full:
        variants["online_full"] = replace(base, online=True)
    trainers = {name: Trainer.create(c) for name, c in variants.items()}
    if cfg.online_full:  # the same targets, the UNet run to its end (as online DRA is usually written)
        tr = trainers["online_full"]
        trainers["online_full"] = replace(tr, extractor=FeatureExtractor(tr.extractor.model, stop_early=False,
                                                                         **tr.extractor.options()))
    device = trainers["plain"].rt.device
    steps, feeds = step_fns(trainers)
    reader = _reader_pass(open_cache(str(store)).part("train"), cfg.train_batch_size, cfg.seed)
    fns = steps | {"reader_pass": reader}
    try:
        times = B.interleaved(fns, rounds=cfg.train_steps, warmup=2, device=device)
    finally:
        for f in feeds.values():
            f.close()
    s = {name: B.median(times[name]) for name in trainers}
    train_rate = cfg.train_batch_size / s["cached"]
    reader_rate = reader.samples_per_pass / B.median(times["reader_pass"])
    out = {f"train_{name}_step_s": v for name, v in s.items()}
    out |= {"train_cached_over_plain": s["cached"] / s["plain"],
            "train_stream_over_plain": s["cached_stream"] / s["plain"],
            "train_online_over_cached": s["online"] / s["cached"],
            "train_samples_per_s": train_rate, "reader_samples_per_s": reader_rate,
            "reader_over_train": reader_rate / train_rate}
    if cfg.online_full:
        out["train_online_full_over_cached"] = s["online_full"] / s["cached"]
    return out


# --- reader memory on a store larger than the budget -------------------------------------------
def build_store(url: Path, raw_mb: int, *, d: int = 512, k: int = 4, seed: int = 0) -> None:
    """A complete store of random float16 features, ``raw_mb`` MiB raw, written shard by shard."""
    from pipeline.cache.targets import Pooling, TargetSpec
    from pipeline.cache.testing import write_store

    n = raw_mb * 2**20 // (k * d * 2)
    target = TargetSpec(100, "mid_block", Pooling.mean, (d,))  # stand-in values of this shape
    rng = np.random.default_rng(seed)
    write_store(str(url), keys=[f"bench-{i:08d}" for i in range(n)], labels=np.zeros(n, np.int64), k=k, targets=[target],
                features={target.name: lambda a, b: rng.standard_normal((b - a, k, d), np.float32).astype(np.float16)},
                seed=seed, rows_per_chunk=256, chunks_per_shard=16)


def reader_child(url: str, budget_mb: int, batch_size: int, seed: int, read: bool = True) -> None:
    """In a fresh process: open the store, pick RAM or streaming as `train` does, read one epoch.

    Prints one JSON line: peak RSS (MiB), samples/s, chunks read. ``read=False`` gives the
    baseline (interpreter, torch, zarr, the part's metadata) without any feature read.
    """
    from pipeline.cache.store import open_cache
    from pipeline.train.data import WINDOW, feature_bytes, plan_memory, target_reader
    from pipeline.train.sampler import MixedSampler

    part = open_cache(url).part("train")
    stream, _ = plan_memory({"train": (part, part.n)}, features=True, budget_mb=budget_mb)  # train.open_data's rule
    reader = target_reader(part, part.n, stream=stream, window=WINDOW) if read else None
    sampler = MixedSampler(n_real=part.n, k_real=part.k, batch_size=batch_size, seed=seed,
                           chunk_real=part.rows_per_chunk if stream else 0, window=WINDOW)
    t0, samples = time.perf_counter(), 0
    if read:
        for b in sampler.batches(0):
            reader.get(b.real_rows, b.real_views)
            samples += len(b.real_rows)
    dt = time.perf_counter() - t0
    print(json.dumps({"peak_rss_mb": B.peak_rss_mb(), "samples_per_s": samples / dt if samples else 0.0,
                      "stream": stream, "chunks_read": getattr(reader, "reads", 0), "n_chunks": part.n_chunks,
                      "feature_mb": feature_bytes(part, part.n) / 2**20}))


def bench_memory(cfg: BenchConfig, work: Path) -> dict:
    big, half = work / "big.zarr", work / "half.zarr"
    build_store(big, cfg.stream_cache_mb, seed=cfg.seed)
    build_store(half, cfg.stream_cache_mb // 2, seed=cfg.seed)

    def child(url: Path, read: bool = True) -> dict:
        code = (f"import pipeline.bench.training as b; b.reader_child({str(url)!r}, {cfg.memory_budget_mb}, "
                f"{cfg.train_batch_size}, {cfg.seed}, read={read})")
        return B.run_child(code, env={"PYTHONPATH": str(ROOT)})

    runs = {"big": [], "half": [], "base": []}
    for _ in range(min(2, cfg.repeats)):  # interleaved; the peak is a max, the rate a median
        runs["big"].append(child(big))
        runs["half"].append(child(half))
        runs["base"].append(child(big, read=False))
    out = {"reader_budget_mb": cfg.memory_budget_mb,
           "reader_cache_mb": runs["big"][0]["feature_mb"], "reader_cache_disk_mb": B.dir_bytes(big) / 2**20,
           "reader_peak_rss_mb": max(r["peak_rss_mb"] for r in runs["big"]),
           "reader_peak_rss_mb_half": max(r["peak_rss_mb"] for r in runs["half"]),
           "reader_cache_mb_half": runs["half"][0]["feature_mb"],
           "reader_rss_baseline_mb": max(r["peak_rss_mb"] for r in runs["base"]),
           "reader_streamed": all(r["stream"] for r in runs["big"] + runs["half"]),
           "reader_chunk_reads_per_chunk": runs["big"][0]["chunks_read"] / runs["big"][0]["n_chunks"],
           "reader_big_samples_per_s": B.median([r["samples_per_s"] for r in runs["big"]])}
    out["reader_rss_growth_mb"] = out["reader_peak_rss_mb"] - out["reader_peak_rss_mb_half"]
    # flat: doubling the cache adds < 5% of the added data to the peak, and the reader stays in budget
    out["reader_rss_growth_fraction"] = out["reader_rss_growth_mb"] / (out["reader_cache_mb"] - out["reader_cache_mb_half"])
    out["reader_within_budget"] = out["reader_peak_rss_mb"] - out["reader_rss_baseline_mb"] <= cfg.memory_budget_mb
    for p in (big, half):
        shutil.rmtree(p, ignore_errors=True)
    return out

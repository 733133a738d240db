"""What `python -m pipeline bench` measures, one function per figure group (the recipe and the
claims: stages/bench.py)."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench import benchmark as B
from pipeline.bench.config import BenchConfig
from pipeline.cache.config import ExtractConfig
from pipeline.core.errors import UserError
from pipeline.diffusion.config import DiffusionConfig
from pipeline.train.config import TrainConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository (children run `python -m pipeline` there)


def check_config(cfg: BenchConfig) -> None:
    cfg.validate()
    if not (Path(cfg.source).exists()):
        raise UserError(f"--source {cfg.source}: not found (the Fashion-MNIST IDX folder)")
    if cfg.device not in ("auto", "cpu", "cuda") or (cfg.device == "cuda" and not torch.cuda.is_available()):
        raise UserError(f"--device {cfg.device!r}: choose auto, cpu or cuda (cuda needs a GPU)")


def _quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a stage's code without its stdout lines (the bench prints one table)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def _say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- inputs ------------------------------------------------------------------------------------
def make_inputs(cfg: BenchConfig, work: Path) -> tuple[Path, Path]:
    """Real shards (first n of each split) and a default-size class-conditional UNet (random weights)."""
    from pipeline.core.shards import join, make_keys, write_split
    from pipeline.data.sources import read_source
    from pipeline.diffusion.model import build_unet, make_scheduler, save_model

    shards = work / "shards"
    for split, data in read_source(cfg.source, limit=cfg.n).items():  # what `prepare` writes
        _quiet(write_split, join(shards, split), data, make_keys("fmnist", split, len(data.labels)), shard_size=1024,
               progress=False)
    d = DiffusionConfig()
    torch.manual_seed(cfg.seed)
    unet = build_unet(image_size=28, in_channels=1, num_classes=10, block_channels=d.block_channels,
                      layers_per_block=d.layers_per_block)
    model = work / "unet"
    save_model(model, unet, make_scheduler(d.num_train_timesteps, d.beta_schedule), {})
    return shards, model


def extract_config(cfg: BenchConfig, shards: Path, model: Path, out: Path) -> ExtractConfig:
    return ExtractConfig(model=str(model), real=str(shards), synthetic="", out=str(out), t=cfg.t, layer=cfg.layer,
                         views=cfg.views, batch_size=cfg.batch_size, chunks_per_shard=cfg.chunks_per_shard,
                         seed=cfg.seed)


# --- extract vs the bare forward ---------------------------------------------------------------
def bench_extract(cfg: BenchConfig, work: Path, shards: Path, model_dir: Path) -> tuple[dict, Path]:
    from pipeline.cache.build import extract
    from pipeline.core.shards import read_split
    from pipeline.diffusion.model import load_model

    device = "cuda" if torch.cuda.is_available() and cfg.device != "cpu" else "cpu"
    model = load_model(str(model_dir), device=device)
    imgs = [read_split(shards / "train").images] * cfg.views + [read_split(shards / "test").images]
    x = torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2).float().div(255).to(device)
    outs: list[Path] = []

    def run_extract() -> None:
        outs.append(work / f"feats{len(outs)}.zarr")
        _quiet(extract, extract_config(cfg, shards, model_dir, outs[-1]))

    def rerun() -> None:  # a finished store: everything but the features (the fixed costs)
        _quiet(extract, extract_config(cfg, shards, model_dir, outs[-1]))

    def forward() -> None:
        B.bare_forward(model.unet, model.scheduler, x, t=cfg.t, layer=cfg.layer, batch_size=cfg.batch_size,
                       class_label=model.null_class)

    times = B.interleaved({"extract": run_extract, "forward": forward, "extract_rerun": rerun},
                          rounds=cfg.repeats, warmup=1, device=device)
    for old in outs[:-1]:
        shutil.rmtree(old, ignore_errors=True)
    ext, fwd, fixed = (B.median(times[k]) for k in ("extract", "forward", "extract_rerun"))
    return {"extract_s": ext, "forward_s": fwd, "extract_fixed_s": fixed, "views": len(x),
            "extract_over_forward": (ext - fixed) / fwd, "extract_stage_over_forward": ext / fwd,
            "extract_views_per_s": len(x) / ext, "forward_views_per_s": len(x) / fwd,
            "extract_method": "extract_over_forward: (extract stage - its fixed costs) / bare forward, the "
                              "fixed costs (model load, shard reading, mean/std, probe, checksums) timed as a "
                              "re-run over the finished store; extract_stage_over_forward: the whole stage"}, outs[-1]


def bench_multi(cfg: BenchConfig, work: Path, shards: Path, model_dir: Path) -> dict:
    """The whole extract stage with T timesteps x L layers (one store, T forwards per view) / the
    stage with one (t, layer), the deepest layer of the list, interleaved; and the feature bytes per
    view of each target set of the multi-target store."""
    from pipeline.cache.build import extract
    from pipeline.cache.store import open_cache

    ts, layers = cfg.multi_t.split(","), cfg.multi_layer.split(",")
    outs: dict[str, list[Path]] = {"multi": [], "single": []}

    def run(name: str, t: str, layer: str) -> Any:
        def one() -> None:
            outs[name].append(work / f"{name}{len(outs[name])}.zarr")
            _quiet(extract, replace(extract_config(cfg, shards, model_dir, outs[name][-1]), t=t, layer=layer))
        return one

    times = B.interleaved({"multi": run("multi", cfg.multi_t, cfg.multi_layer),
                           "single": run("single", ts[0], layers[-1])}, rounds=cfg.multi_repeats, warmup=0)
    store = outs["multi"][-1]
    cache = open_cache(str(store))
    per_set = {}
    for spec in cache.targets:
        parts = [cache.part(name, spec) for name in cache.parts]
        disk = sum(B.dir_bytes(store / p.name / "targets" / spec.name / "features") for p in parts)
        per_set[spec.name] = disk / sum(p.n * p.k for p in parts)
    for old in outs["multi"] + outs["single"]:
        shutil.rmtree(old, ignore_errors=True)
    multi, single = B.median(times["multi"]), B.median(times["single"])
    return {"multi_s": multi, "single_s": single, "multi_timesteps": len(ts), "multi_layers": len(layers),
            "multi_over_single": multi / single, "multi_over_single_per_timestep": multi / single / len(ts),
            "multi_bytes_per_view_per_set": per_set,
            "multi_method": f"whole extract stage, {len(ts)} timesteps x {len(layers)} layers ({cfg.multi_t} x "
                            f"{cfg.multi_layer}) / the stage for t={ts[0]} at {layers[-1]} alone, median of "
                            f"{cfg.multi_repeats} interleaved runs; target: <= 1.1 per timestep"}


def storage(store: Path) -> dict:
    """Feature bytes on disk per (sample, view), and raw float16 bytes / disk bytes."""
    from pipeline.cache.store import open_cache

    cache = open_cache(str(store))
    disk = raw = views = 0
    for name in cache.parts:
        p = cache.part(name)
        disk += B.dir_bytes(store / name / "targets" / p.target.name / "features")
        raw += p.n * p.k * p.d * 2
        views += p.n * p.k
    d = cache.part("train").d
    return {"bytes_per_view": disk / views, "raw_bytes_per_view": 2 * d, "compression_ratio": raw / disk,
            "feature_dim": d}


# --- training steps and the target reader ------------------------------------------------------
def _steps(tr: Any) -> Any:
    """(batch, inputs) of the trainer's feed, epoch after epoch; closes the prefetch thread."""
    epoch = 0
    while True:
        feed = tr.feed(epoch, 0)
        try:
            yield from feed
        finally:
            feed.close()
        epoch += 1


def _reader_pass(part: Any, batch_size: int, seed: int) -> Any:
    """A callable reading one epoch of targets (chunk-aware order) through the streaming reader."""
    from pipeline.train.data import target_reader
    from pipeline.train.sampler import MixedSampler
    from pipeline.train.trainer import WINDOW

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
    feeds = {name: _steps(tr) for name, tr in trainers.items()}
    def step(name: str) -> Any:
        def one() -> None:
            tr = trainers[name]
            tr.net.train()
            batch, inputs = next(feeds[name])
            tr.step(0, batch, inputs)  # step 0: the lr schedule does not change the cost
        return one

    reader = _reader_pass(open_cache(str(store)).part("train"), cfg.train_batch_size, cfg.seed)
    fns = {name: step(name) for name in trainers} | {"reader_pass": reader}
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
    from pipeline.cache.store import NORMALISATION, CacheWriter, PartInit
    from pipeline.cache.targets import Pooling, TargetSpec, targets_attrs
    from pipeline.core.views import ViewSpec, sample_views

    n = raw_mb * 2**20 // (k * d * 2)
    target = TargetSpec(100, "mid_block", Pooling.mean, (d,))  # stand-in values of this shape
    init = PartInit([f"bench-{i:08d}" for i in range(n)], np.zeros(n, np.int64), sample_views(n, k, ViewSpec(), seed),
                    np.zeros((n, k), np.int64), [target], {"shards": "", "fingerprint": {}})
    plan = {"model": {"source": "synthetic benchmark store"}, **targets_attrs([target]), "normalisation": NORMALISATION,
            "view_spec": ViewSpec().to_dict(), "seed": seed}
    w = CacheWriter.open_or_create(str(url), plan=plan, parts={"train": init}, rows_per_chunk=256,
                                   chunks_per_shard=16, compressor="blosc-zstd")
    rng = np.random.default_rng(seed)
    for s in range(w.n_shards("train")):
        a, b = w.shard_rows("train", s)
        w.write_shard("train", s, {target.name: rng.standard_normal((b - a, k, d), np.float32).astype(np.float16)})
    w.finalize_part("train")
    w.finalize({})


def reader_child(url: str, budget_mb: int, batch_size: int, seed: int, read: bool = True) -> None:
    """In a fresh process: open the store, pick RAM or streaming as `train` does, read one epoch.

    Prints one JSON line: peak RSS (MiB), samples/s, chunks read. ``read=False`` gives the
    baseline (interpreter, torch, zarr, the part's metadata) without any feature read.
    """
    from pipeline.cache.store import open_cache
    from pipeline.train.data import feature_bytes, target_reader
    from pipeline.train.sampler import MixedSampler
    from pipeline.train.trainer import WINDOW

    part = open_cache(url).part("train")
    stream = budget_mb == 0 or feature_bytes(part, part.n) > budget_mb * 2**20  # the rule of train.open_data
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
        code = (f"import pipeline.bench.measure as b; b.reader_child({str(url)!r}, {cfg.memory_budget_mb}, "
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


# --- two extract processes vs one --------------------------------------------------------------
def bench_two_proc(cfg: BenchConfig, work: Path, shards: Path, model: Path) -> dict:
    """Whole `extract` commands, 1 vs 2 processes, each process given cores/2 threads.

    Each process gets the same threads in both runs, so the ratio is what a second process adds
    (on a 2-core machine: 1 thread each). Fixed costs (start-up, reading shards, probe,
    checksums) are measured as re-runs over the finished stores and reported apart.
    """
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2
    threads = max(1, cores // 2)
    env = {"OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    if not torch.cuda.is_available():
        env["ACCELERATE_USE_CPU"] = "true"  # and --multi_gpu: the only way to get 2 CPU processes
    one = [sys.executable, "-m", "pipeline"]
    two = [str(Path(sys.executable).with_name("accelerate")), "launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "pipeline"]
    count = {"one": 0, "two": 0}

    def args(tag: str, fresh: bool) -> list[str]:
        if fresh:
            count[tag] += 1
        c = extract_config(cfg, shards, model, work / f"x{tag}{count[tag]}.zarr")
        return ["extract", "--model", c.model, "--real", c.real, "--synthetic", "", "--out", c.out, "--t", str(c.t),
                "--layer", c.layer, "--views", str(c.views), "--batch-size", str(c.batch_size),
                "--chunks-per-shard", str(c.chunks_per_shard), "--seed", str(c.seed)]

    fns = {"one": lambda: B.timed_command(one + args("one", True), env=env, cwd=str(ROOT)),
           "two": lambda: B.timed_command(two + args("two", True), env=env, cwd=str(ROOT)),
           "one_rerun": lambda: B.timed_command(one + args("one", False), env=env, cwd=str(ROOT)),
           "two_rerun": lambda: B.timed_command(two + args("two", False), env=env, cwd=str(ROOT))}
    times = B.interleaved(fns, rounds=2, warmup=0)  # whole commands: each round is ~1 min on 2 cores
    m = {k: B.median(v) for k, v in times.items()}
    for p in work.glob("x*.zarr"):
        shutil.rmtree(p, ignore_errors=True)
    return {"extract_2proc_speedup": m["one"] / m["two"],
            "extract_2proc_speedup_without_fixed": (m["one"] - m["one_rerun"]) / (m["two"] - m["two_rerun"]),
            "extract_1proc_s": m["one"], "extract_2proc_s": m["two"],
            "extract_1proc_fixed_s": m["one_rerun"], "extract_2proc_fixed_s": m["two_rerun"],
            "extract_2proc_method": f"accelerate launch --num_processes 2 vs python -m pipeline, whole extract "
                                    f"commands, {threads} torch thread(s) per process on {cores} cores"}

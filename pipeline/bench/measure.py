"""What `python -m pipeline bench` measures, one function per figure group (the recipe and the
claims: stages/bench.py)."""

from __future__ import annotations

import contextlib
import io
import itertools
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
from pipeline.core.runtime import usable_cores
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
    return ExtractConfig(model=str(model), real_splits=str(shards), synthetic="", out=str(out), t=cfg.t, layer=cfg.layer,
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


def _step_fns(trainers: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A callable per trainer running its next training step (the benchmark interleaves them), and
    the feeds to close afterwards. Step 0 each time: the lr schedule does not change the cost."""
    feeds = {name: _steps(tr) for name, tr in trainers.items()}

    def step(name: str) -> Any:
        def one() -> None:
            tr = trainers[name]
            tr.net.train()
            batch, inputs = next(feeds[name])
            tr.step(0, batch, inputs)
        return one

    return {name: step(name) for name in trainers}, feeds


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
    steps, feeds = _step_fns(trainers)
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
    cores = usable_cores()
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
        return ["extract", "--model", c.model, "--real-splits", c.real_splits, "--synthetic", "", "--out", c.out, "--t", str(c.t),
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
    from pipeline.cache.store import IMAGES, NORMALISATION, CacheWriter, PartInit
    from pipeline.cache.targets import Pooling, TargetSpec, targets_attrs
    from pipeline.core.shards import FINGERPRINT, content_hash, make_fingerprint, shard_name
    from pipeline.core.views import ViewSpec, sample_views

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
    view = ViewSpec(pad=4)
    target = TargetSpec(100, "mid_block", Pooling.mean, (d,))
    init = PartInit(keys, labels, sample_views(rows, k, view, seed), np.zeros((rows, k), np.int64), [target],
                    {"shards": str(split), "fingerprint": {x: fp[x] for x in ("content_hash", "count", "shards_digest",
                                                                              "image_shape", "num_classes")}},
                    image_shape=IMAGE_SHAPE)
    plan = {"model": {"source": "synthetic benchmark store"}, **targets_attrs([target]), "normalisation": NORMALISATION,
            "view_spec": view.to_dict(), "seed": seed, "image_size": IMAGE_SHAPE[0], "in_channels": IMAGE_SHAPE[2]}
    w = CacheWriter.open_or_create(str(url), plan=plan, parts={"train": init}, rows_per_chunk=256,
                                   chunks_per_shard=16, compressor="blosc-zstd")
    rng = np.random.default_rng([seed, 3])
    for s in range(len(bounds)):
        block = images(s)
        for c in range(w.n_shards("train")):
            a, b = w.shard_rows("train", c)
            if bounds[s][0] <= a < bounds[s][1]:
                feats = rng.standard_normal((b - a, k, d), np.float32).astype(np.float16)
                w.write_shard("train", c, {target.name: feats, IMAGES: block[a - bounds[s][0]:b - bounds[s][0]]})
    w.finalize_part("train")
    w.finalize({})
    return url


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
    feed = _steps(tr)
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

    _say(f"building CIFAR-sized stores of {cfg.image_rows_small} and {cfg.image_rows_big} rows")
    small = build_image_store(work, cfg.image_rows_small, seed=cfg.seed)
    big = build_image_store(work, cfg.image_rows_big, seed=cfg.seed)
    cfg_json = json.dumps(cfg.__dict__)  # enums are str subclasses: they serialise as their values

    def child(url: Path, tag: str) -> dict:
        code = (f"import pipeline.bench.measure as b; b.image_train_child({cfg_json!r}, {str(url)!r}, "
                f"{str(work / ('train-' + tag))!r}, {cfg.memory_budget_mb}, {cfg.image_steps})")
        return B.run_child(code, env={"PYTHONPATH": str(ROOT)})

    _say("peak RSS of a training process on each store (fresh processes)")
    runs = {"small": child(small, "small"), "big": child(big, "big")}
    added_mb = (cfg.image_rows_big - cfg.image_rows_small) * int(np.prod(IMAGE_SHAPE)) / 2**20
    _say("step time, images streamed vs in RAM (small store, interleaved)")
    base = _image_train_config(cfg, small, work / "train-ratio", 0)
    trainers = {"stream": Trainer.create(base), "ram": Trainer.create(replace(base, memory_budget_mb=1 << 20))}
    steps, feeds = _step_fns(trainers)
    try:
        times = B.interleaved(steps, rounds=cfg.train_steps, warmup=2, device=trainers["ram"].rt.device)
    finally:
        for f in feeds.values():
            f.close()
    modes = {name: tr.data.images for name, tr in trainers.items()}
    trainers.clear()  # the in-RAM images go before the big store is read
    s = {name: B.median(v) for name, v in times.items()}
    _say("reader and data pipeline over the big store (no model)")
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

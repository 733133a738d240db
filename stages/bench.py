"""`python -m pipeline bench`: what the cache saves, measured in one run on real Fashion-MNIST.

Claims (the design's performance targets, docs/benchmarks.md) and how each figure is measured, all through the
project's own code paths (the extract stage, the train stage's step, the sampler's target
readers, the cache writer), on the default-size UNet (32/64/64 channels, 28 px, class-
conditional, random weights: timing does not need trained ones):

- ``extract_over_forward``: the `extract` stage (``pipeline.cache.build.extract``: views, per-view noise
  generators, forward stopped at the block, pooling, float16, writing) / a bare forward of the
  same images in the same batches (noise + UNet up to the block, nothing else), both per view:
  the stage's fixed costs (model load, reading shards, mean/std, probe, checksums; they do not
  grow with K and are a few seconds) are timed as a re-run over the finished store, which
  computes nothing, and subtracted. ``extract_stage_over_forward`` is the whole stage.
- ``train_*``: seconds per step of `train` variants on that cache, interleaved step by step:
  plain PGD-AT, AT+DRA with targets in RAM and streamed, online (early-stopped forward), online
  with the whole UNet forward.
- ``reader_over_train``: samples/s of the streaming target reader over an epoch in the chunk-aware
  order / samples/s of the cached AT+DRA step.
- ``reader_peak_rss_mb``: peak RSS of a fresh process streaming an epoch of a synthetic store larger
  than ``memory_budget_mb`` (and of one half that size, to show it is flat).
- ``multi_over_single``: the whole `extract` stage writing T timesteps x L layers (one forward per
  timestep, every layer hooked) / the stage writing one (t, layer) at the deepest of those layers;
  per timestep it should be close to 1 (the extra layers nearly free); bytes per view of each set.
- ``images_*``: images streamed with their targets from the cache, on CIFAR-sized (32x32x3) train
  parts of random pixels (``image_rows_small``, ``image_rows_big``; no diffusion model needed):
  peak RSS of a fresh `train` process on each (growth / added image data, target <= 5%), step
  time with streamed / in-RAM images (interleaved, target <= 1.05), and the data pipeline's
  samples/s (``assemble``: images, targets, views) from a dropped page cache where the machine
  allows / training samples/s (target >= 20).
- ``extract_2proc_speedup``: `extract` under ``accelerate launch`` with 2 processes vs 1, each
  process with the same number of threads (``method`` says how).

``--profile gpu`` measures the figures of a CIFAR-sized run on one CUDA GPU instead
(``pipeline/bench/gpu.py`` says which; ``--dry-run``: the same code at tiny sizes on the CPU).

Every time is the median of interleaved repeats (A, B, B, A, ...), so both sides of a ratio see the
same load on a shared machine. Speed is never asserted in tests; this command reports it.
"""


from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.bench import benchmark as B
from pipeline.bench.config import BenchConfig
from pipeline.bench.extraction import bench_extract, bench_multi, bench_two_proc, storage
from pipeline.bench.figures import TARGETS, table
from pipeline.bench.gpu import gpu_table, run_gpu
from pipeline.bench.ingest import bench_ingest
from pipeline.bench.measure import check_config, make_inputs, say
from pipeline.bench.streaming import bench_images
from pipeline.bench.training import bench_memory, bench_train
from pipeline.core.runtime import choose_device
from pipeline.core.storage import atomic_write


def run(cfg: BenchConfig) -> dict:
    check_config(cfg)
    out = Path(cfg.out)
    work = Path(cfg.workdir) if cfg.workdir else Path(tempfile.mkdtemp(prefix="bench-"))
    work.mkdir(parents=True, exist_ok=True)
    device = "cpu" if cfg.dry_run else choose_device(cfg.device).type
    res: dict[str, Any] = {"machine": B.machine(device), "config": json.loads(json.dumps(cfg.__dict__, default=str))}
    t0 = time.perf_counter()
    groups = set(cfg.groups) if cfg.profile == "cpu" else set()
    try:
        if cfg.profile == "gpu":
            say("GPU profile: CIFAR-sized UNet and classifiers" + (" (dry run: tiny sizes on the CPU)" if cfg.dry_run else ""))
            res |= run_gpu(cfg, torch.device(device))
        if groups & {"extract", "multi", "train", "two_proc"}:
            say("preparing real Fashion-MNIST shards and a default-size UNet")
            shards, model = make_inputs(cfg, work)
        if groups & {"extract", "train"}:  # the training steps run on the store extract writes
            say(f"extract vs bare forward ({cfg.repeats} interleaved repeats)")
            ext, store = bench_extract(cfg, work, shards, model)
            res |= ext | storage(store)
        if "multi" in groups:
            say(f"extract {cfg.multi_t} x {cfg.multi_layer} in one pass vs one target set")
            res |= bench_multi(cfg, work, shards, model)
        if "train" in groups:
            say(f"training steps ({cfg.train_steps} per variant, interleaved) and the target reader")
            res |= bench_train(cfg, work, store)
        if "memory" in groups:
            say(f"reader memory: {cfg.stream_cache_mb} MiB and half-size stores, budget {cfg.memory_budget_mb} MiB")
            res |= bench_memory(cfg, work)
        if "two_proc" in groups and cfg.two_proc and torch.cuda.is_available() and torch.cuda.device_count() < 2:
            res["extract_2proc_method"] = "skipped: 2 processes need 2 GPUs on a GPU machine"
        elif "two_proc" in groups and cfg.two_proc:
            say("extract with 2 processes vs 1")
            res |= bench_two_proc(cfg, work, shards, model)
        if "images" in groups:
            res |= bench_images(cfg, work)
        if "ingest" in groups:
            t1 = time.perf_counter()
            res |= bench_ingest(cfg, work)
            res["ingest_seconds"] = time.perf_counter() - t1
    finally:
        if not cfg.workdir:
            shutil.rmtree(work, ignore_errors=True)
    res["seconds"] = time.perf_counter() - t0
    res["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    res["targets"] = {k: {"op": op, "value": v, "met": bool(res[k] <= v if op == "<=" else res[k] >= v)}
                      for k, (op, v) in TARGETS.items() if k in res}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, json.dumps(res, indent=2) + "\n")
    text = table(res) if cfg.profile == "cpu" else gpu_table(res)
    out.with_suffix(".txt").write_text(text + "\n")  # the table, for the README
    print(text)
    print(f"written: {out} and {out.with_suffix('.txt')}")
    return res

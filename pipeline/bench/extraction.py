"""Extraction figures of `python -m pipeline bench`: the extract stage against a bare forward, T x L
target sets against one, feature bytes on disk, and two extract processes against one."""

from __future__ import annotations

import shutil
import sys
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.bench import benchmark as B
from pipeline.bench.config import BenchConfig
from pipeline.bench.measure import ROOT, extract_config, quiet
from pipeline.core.runtime import choose_device, usable_cores


# --- extract vs the bare forward ---------------------------------------------------------------
def bench_extract(cfg: BenchConfig, work: Path, shards: Path, model_dir: Path) -> tuple[dict, Path]:
    from pipeline.cache.build import extract
    from pipeline.core.shards import read_split
    from pipeline.diffusion.model import load_model

    device = choose_device(cfg.device).type
    model = load_model(str(model_dir), device=device)
    imgs = [read_split(shards / "train").images] * cfg.views + [read_split(shards / "test").images]
    x = torch.from_numpy(np.concatenate(imgs)).permute(0, 3, 1, 2).float().div(255).to(device)
    outs: list[Path] = []

    def run_extract() -> None:
        outs.append(work / f"feats{len(outs)}.zarr")
        quiet(extract, extract_config(cfg, shards, model_dir, outs[-1]))

    def rerun() -> None:  # a finished store: everything but the features (the fixed costs)
        quiet(extract, extract_config(cfg, shards, model_dir, outs[-1]))

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
            quiet(extract, replace(extract_config(cfg, shards, model_dir, outs[name][-1]), t=t, layer=layer))
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

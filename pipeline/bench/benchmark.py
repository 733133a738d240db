"""Timing helpers for `bench`: interleaved repeats, medians, child processes, the machine.

Why interleave: the machines this runs on are shared, and load changes over seconds. Timing A
ten times and then B ten times compares two different machines; running A, B, B, A, A, B, ...
lets both see the same load, so their ratio is what one run measures reliably. Every figure is a
median over repeats (robust to the odd slow repeat), and each result carries the machine it was
measured on, the load average and the torch thread count.
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from pipeline.core.runtime import cpu_model, peak_rss_mb, usable_cores  # noqa: F401 - stages/bench.py and child processes use B.peak_rss_mb


def median(xs: list[float]) -> float:
    return float(statistics.median(xs))


def sync(device: torch.device | str) -> None:
    """Wait for queued GPU work, so a timer measures the work and not its launch."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def interleaved(fns: dict[str, Callable[[], Any]], *, rounds: int, warmup: int = 1,
                device: torch.device | str = "cpu") -> dict[str, list[float]]:
    """Seconds of each call, the callables alternating A, B, B, A, ... (``warmup`` rounds dropped)."""
    times: dict[str, list[float]] = {name: [] for name in fns}
    order = list(fns)
    for i in range(warmup + rounds):
        for name in order if i % 2 == 0 else order[::-1]:
            sync(device)
            t0 = time.perf_counter()
            fns[name]()
            sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return times


def timed_command(cmd: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None) -> float:
    """Wall seconds of a command; raises with the end of its output if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env={**os.environ, **(env or {})}, cwd=cwd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-2000:]
        raise RuntimeError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n{tail}")
    return wall


def run_child(code: str, *, env: dict[str, str] | None = None) -> dict:
    """Run Python ``code`` in a fresh interpreter that prints one JSON object on its last line.

    A fresh process is how peak RSS is measured cleanly: the child's own VmHWM (``peak_rss_mb``),
    nothing inherited from the benchmark's own allocations.
    """
    proc = subprocess.run([sys.executable, "-c", code], env={**os.environ, **(env or {})},
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{(proc.stdout + proc.stderr)[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dir_bytes(path: str | Path, *, skip: tuple[str, ...] = ("zarr.json",)) -> int:
    """Bytes of the data files under a folder (metadata files named in ``skip`` left out)."""
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and p.name not in skip)


def machine(device: torch.device | str) -> dict:
    """What the figures were measured on."""
    cores = usable_cores()
    dev = torch.device(device)
    return {"cpu": cpu_model(), "cores": cores, "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "device": dev.type,
            "gpu": torch.cuda.get_device_name(dev) if dev.type == "cuda" else None,
            "load_avg_1m": round(os.getloadavg()[0], 2)}


class _Stop(Exception):
    pass


def _stop(_module: torch.nn.Module, _inputs: Any, _output: Any) -> None:
    raise _Stop


@torch.no_grad()
def bare_forward(unet: torch.nn.Module, scheduler: Any, images01: torch.Tensor, *, t: int, layer: str,
                 batch_size: int, class_label: int | None) -> None:
    """What extract is compared against: noise through the scheduler, the UNet up to ``layer``.

    Nothing else: the images are already float tensors on the device, one ``randn`` per batch (no
    per-view generators), no augmentation, pooling, float16 conversion or writing.
    """
    dev = next(unet.parameters()).device
    handle = dict(unet.named_modules())[layer].register_forward_hook(_stop)
    try:
        for i in range(0, len(images01), batch_size):
            x0 = images01[i:i + batch_size].to(dev) * 2 - 1
            ts = torch.full((len(x0),), t, dtype=torch.long, device=dev)
            x_t = scheduler.add_noise(x0, torch.randn_like(x0), ts)
            cls = None if class_label is None else torch.full_like(ts, class_label)
            try:
                unet(x_t, ts, class_labels=cls)
            except _Stop:
                pass
    finally:
        handle.remove()

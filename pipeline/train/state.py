"""Run state of `train`: per-epoch statistics, the log, checkpoints and resume.

A checkpoint folder (``--out``) holds, each file written to a temporary name and renamed:

- ``state.safetensors``: everything resume needs, in ONE file so it is always self-consistent:
  live weights (``net.*``), EMA weights (``ema.*``), SGD momentum (``opt.*``), the attack's and
  torch's RNG states, the epoch statistics so far; the metadata holds progress (epoch, step,
  global step, seconds), the log rows and the training config as JSON.
- ``model.safetensors`` (the EMA classifier) + ``config.json``: what ``load_classifier`` and
  ``evaluate`` read. ``config.json`` says ``"finished": false`` until the run ends.
- ``log.tsv``: one row per epoch (each loss term, clean/adversarial accuracy, lr, DRA weight,
  time per step: what ``report``'s curves and the committed results read); ``dvclive/``: the same
  epoch rows and per-step rows through DVCLive (``livelog.py``: ``dvc plots``, ``dvc exp show``);
  ``metrics.json``: the final values, written only when training completes.

A folder that already holds a run is refused (``refuse_replacing``): ``--resume`` continues an
unfinished one, ``--overwrite`` replaces either.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from pipeline.classifiers.zoo import CONFIG_FILE, MODEL_FILE, save_json, save_tensors
from pipeline.core.errors import UserError
from pipeline.core.runtime import peak_rss_mb
from pipeline.core.storage import atomic_write
from pipeline.train.livelog import LIVE_DIR
from pipeline.train.model import EMA
from pipeline.train.validation import BEST_DIR, best_epoch

STATE_FILE = "state.safetensors"
LOG_FILE = "log.tsv"
METRICS_FILE = "metrics.json"
# config fields that may change between a run and its resumption
RESUMABLE_CHANGES = {"resume", "overwrite", "checkpoint_every", "log_every", "cache_digest", "device", "memory_budget_mb", "online", "verify"}
# what a run writes into --out, its finished markers first (the order ``clear`` removes them in)
RUN_FILES = (METRICS_FILE, CONFIG_FILE, STATE_FILE, MODEL_FILE, LOG_FILE)


@dataclass
class RunState:
    epoch: int = 0
    step: int = 0  # next step within the epoch
    global_step: int = 0
    seconds: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)
    counts: dict[str, int] = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    log: list[dict] = field(default_factory=list)
    live: list[dict] = field(default_factory=list)  # the DVCLive rows (livelog.py), step by step
    started: float = field(default_factory=time.perf_counter, repr=False)  # perf_counter at seconds == 0

    def resume_clock(self) -> None:
        """Count wall time on from the restored ``seconds``."""
        self.started = time.perf_counter() - self.seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.started

    def add(self, stats: dict[str, torch.Tensor], dt: float, lr: float, dra_w: float) -> None:
        values = {k: float(v) for k, v in stats.items()}
        if self.step > 0:  # the first step of an epoch includes the prefetch warm-up
            values["step_time_s"] = dt
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
            self.counts[k] = self.counts.get(k, 0) + 1
        self.last = {"lr": lr, "dra_weight": dra_w}

    def end_epoch(self, epoch: int, rt: Any) -> dict:
        keys = sorted(self.sums)
        means = torch.tensor([self.sums[k] / max(self.counts[k], 1) for k in keys], dtype=torch.float64)
        means = rt.mean(means).cpu().tolist()
        row = {"epoch": epoch + 1, "step": self.global_step, **self.last,
               **{k: round(v, 6) for k, v in zip(keys, means)}}
        self.log.append(row)
        self.epoch, self.step, self.sums, self.counts = epoch + 1, 0, {}, {}
        return row

    def summary(self) -> str:
        r = self.log[-1] if self.log else {}
        return " ".join(f"{k}={r[k]:.3f}" for k in ("loss", "dra", "adv_acc", "clean_acc") if k in r)


@dataclass(frozen=True)
class Weights:
    """What a checkpoint restores besides progress: live and EMA weights, SGD momentum, the
    attack's and torch's RNG states. Stored as flat tensors (safetensors: never pickle)."""

    net: torch.nn.Module
    opt: torch.optim.Optimizer
    ema: EMA
    gen: torch.Generator

    def tensors(self) -> dict[str, torch.Tensor]:
        return {**prefixed("net", self.net.state_dict()), **prefixed("ema", self.ema.model.state_dict()),
                **prefixed("opt", optimizer_tensors(self.opt)), "rng.attack": self.gen.get_state(),
                "rng.torch": torch.get_rng_state()}

    def restore(self, tensors: dict[str, torch.Tensor], device: torch.device) -> None:
        self.net.load_state_dict({k: v.to(device) for k, v in unprefixed("net", tensors).items()})
        self.ema.model.load_state_dict({k: v.to(device) for k, v in unprefixed("ema", tensors).items()})
        load_optimizer_tensors(self.opt, unprefixed("opt", tensors))
        self.gen.set_state(tensors["rng.attack"])
        torch.set_rng_state(tensors["rng.torch"])


def _log_tsv(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=cols, delimiter="\t", lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def _comparable(cfg: Any) -> dict:
    d = json.loads(json.dumps(asdict(cfg)))
    return {k: v for k, v in d.items() if k not in RESUMABLE_CHANGES}


def status(out: Path) -> tuple[str, int]:
    """What a run folder holds: ("finished" | "unfinished" | "none", the checkpoint's global step or -1).

    Finished: ``metrics.json`` or ``config.json`` marked finished (``finish`` writes both).
    Unfinished: a checkpoint (the state file) of a run that did not finish; ``--resume`` continues it.
    """
    try:
        finished = (out / METRICS_FILE).exists() or json.loads((out / CONFIG_FILE).read_text()).get("finished") is True
    except (OSError, ValueError, AttributeError):  # no config.json yet, or not a run's
        finished = False
    step = -1
    try:
        with safe_open(str(out / STATE_FILE), framework="pt", device="cpu") as fh:
            step = int(json.loads((fh.metadata() or {})["progress"])["global_step"])
    except (SafetensorError, OSError, KeyError, ValueError, TypeError):
        pass
    return ("finished" if finished else "unfinished" if (out / STATE_FILE).exists() else "none"), step


def refuse_replacing(out: Path, *, resume: bool, overwrite: bool) -> None:
    """A run already in ``out`` is never replaced by accident: a finished one only with
    ``--overwrite``, an unfinished one (a checkpoint) is continued with ``--resume`` or replaced with
    ``--overwrite``. Checked before any file is opened; nothing in ``out`` is touched."""
    if resume or overwrite:
        return
    kind, step = status(out)
    if kind == "finished":
        raise UserError(f"{out} holds a finished run; pass --overwrite to replace it, or choose another --out")
    if kind == "unfinished":
        raise UserError(f"{out} holds an unfinished run (checkpoint at step {step}); pass --resume to continue it "
                        "or --overwrite to start again")


def clear(out: Path) -> None:
    """``--overwrite``: the previous run's files go (its finished markers first) before training starts,
    so that an interrupted new run never sits beside the old one's metrics."""
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / LIVE_DIR, ignore_errors=True)
    shutil.rmtree(out / BEST_DIR, ignore_errors=True)


def save(out: Path, *, cfg: Any, weights: Weights, st: RunState, meta: dict, rt: Any) -> None:
    """Checkpoint (main process only; others wait): model + config + log first, state LAST.

    Important: the state file is the commit point. Written first (as it once was), a run killed
    between it and the model resumed into "nothing left to do" and finished with the previous
    epoch's model.safetensors and log (tests/test_output_safety.py). Written last, an interrupted
    save leaves the old state, and resuming redoes the epoch, rewriting every file.
    """
    st.seconds = st.elapsed()
    if rt.is_main:
        out.mkdir(parents=True, exist_ok=True)
        tensors = weights.tensors()
        progress = {"epoch": st.epoch, "step": st.step, "global_step": st.global_step, "seconds": st.seconds,
                    "sums": st.sums, "counts": st.counts, "last": st.last}
        metadata = {"progress": json.dumps(progress), "log": json.dumps(st.log), "live": json.dumps(st.live),
                    "config": json.dumps(_comparable(cfg)), "cache_digest": str(meta["cache"].get("digest"))}
        save_tensors(out / MODEL_FILE, weights.ema.model.state_dict())
        save_json(out / CONFIG_FILE, {**meta, "finished": False, "progress": progress})
        if st.log:
            atomic_write(out / LOG_FILE, _log_tsv(st.log))
        save_tensors(out / STATE_FILE, tensors, metadata)
    rt.barrier()


def load(out: Path, *, cfg: Any, weights: Weights, device: torch.device, cache_digest: str) -> RunState | None:
    """Restore a checkpoint written by ``save``; None when there is none yet (fresh start).

    Refused when the flags differ or when the cache is another one than the run started on (its
    digest, not its path: a store replaced at the same path is another cache).
    """
    path = out / STATE_FILE
    if not path.is_file():
        print(f"note: no checkpoint in {out}; starting from scratch")
        return None
    try:
        with safe_open(str(path), framework="pt", device="cpu") as fh:
            meta = fh.metadata() or {}
            tensors = {k: fh.get_tensor(k) for k in fh.keys()}
        progress, log, saved = json.loads(meta["progress"]), json.loads(meta["log"]), json.loads(meta["config"])
        live = json.loads(meta.get("live", "[]"))  # checkpoints from before DVCLive have none
    except (SafetensorError, OSError, KeyError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: unreadable checkpoint ({str(exc).splitlines()[0]})") from None
    if meta.get("cache_digest") != str(cache_digest):
        raise UserError(f"{out}: the checkpoint was trained on another cache (digest "
                        f"{str(meta.get('cache_digest'))[:16]}..., this one {str(cache_digest)[:16]}...); "
                        "resume with the same cache or use another --out")
    diff = sorted(k for k in set(saved) | set(_comparable(cfg)) if saved.get(k) != _comparable(cfg).get(k))
    if diff:
        raise UserError(f"{out}: the checkpoint was made with other settings ({', '.join(diff)}); "
                        "use another --out or the same flags")
    weights.restore(tensors, device)
    st = RunState(progress["epoch"], progress["step"], progress["global_step"], progress["seconds"],
                  progress["sums"], progress["counts"], progress["last"], log, live)
    st.resume_clock()
    return st


def finish(out: Path, *, st: RunState, meta: dict, rt: Any, budget: dict, net: torch.nn.Module) -> dict:
    """metrics.json (final epoch's values, the budget, wall time, peak memory); config.json marked finished.

    ``budget`` (``MixedSampler.budget`` + steps per epoch) is what two compared runs must share:
    optimizer steps and samples seen, real and synthetic.

    With several processes it first checks that all of them hold the same weights.
    """
    seconds = st.elapsed()
    if not rt.synchronised(net):
        raise RuntimeError("data-parallel processes ended with different weights (gradient sync failed)")
    last = st.log[-1] if st.log else {}
    metrics = {**{k: v for k, v in last.items() if k != "epoch"}, "epochs": st.epoch,
               "steps_per_epoch": budget["steps_per_epoch"], "budget": budget, "train_seconds": round(seconds, 3),
               "target_mode": meta["cache"]["target_mode"],
               "image_mode": meta["cache"].get("image_mode", "ram"), "processes": rt.world, "synchronised": True,
               "device": rt.device.type, "precision": rt.precision,  # what ran, not what --device asked
               # each process's own peak (MiB, rank order): flat in the cache size when streaming
               "peak_rss_mb_per_process": [round(x, 1) for x in rt.gather(peak_rss_mb())]}
    best = best_epoch(st.log)
    if best is not None:  # --val-n: the epoch whose EMA model OUT/best holds
        metrics["best"] = {**best, "folder": BEST_DIR}
    if rt.is_main:
        atomic_write(out / METRICS_FILE, json.dumps(metrics, indent=2) + "\n")
        cfg = json.loads((out / CONFIG_FILE).read_text())
        save_json(out / CONFIG_FILE, {**cfg, "finished": True})
    rt.barrier()
    return metrics


# --- run state as flat tensor dicts (safetensors) ---------------------------------------------
def optimizer_tensors(opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """SGD momentum buffers by parameter position."""
    out = {}
    params = [p for g in opt.param_groups for p in g["params"]]
    for i, p in enumerate(params):
        buf = opt.state.get(p, {}).get("momentum_buffer")
        if buf is not None:
            out[f"momentum.{i}"] = buf
    return out


def load_optimizer_tensors(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor]) -> None:
    params = [p for g in opt.param_groups for p in g["params"]]
    for key, t in tensors.items():
        p = params[int(key.split(".")[1])]
        opt.state[p]["momentum_buffer"] = t.to(p.device, p.dtype).clone()


def prefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {f"{prefix}.{k}": v for k, v in tensors.items()}


def unprefixed(prefix: str, tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    n = len(prefix) + 1
    return {k[n:]: v for k, v in tensors.items() if k.startswith(prefix + ".")}

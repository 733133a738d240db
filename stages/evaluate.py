"""Stage `evaluate`: clean, PGD and AutoAttack accuracy of a checkpoint (its EMA weights).

Recipe: load the checkpoint and the first N test images, check the model (eval mode,
deterministic logits, non-zero input gradients), measure clean accuracy, PGD-CE with restarts
(worst case over restarts), AutoAttack (Linf), and a large-eps PGD that must break the model.
Writes the full result JSON (threat model, eps, attacks, n, checks, timings) and a flat metrics
JSON for ``dvc metrics show``, both atomically.

Under ``accelerate launch`` with P processes the N images are split into P contiguous slices in
rank order (sizes differ by at most 1); each process runs clean, PGD and AutoAttack on its slice,
the per-sample correctness masks and perturbation stats are gathered on rank 0, and rank 0 alone
runs the model and large-eps checks (on the first ``check_n`` images), computes the figures and
writes both files; the other processes write nothing. Clean and PGD figures do not depend on P:
a PGD random start is a function of (seed, batch size, the image's global index, the restart).
AutoAttack's may, slightly: it reseeds itself for every batch of the points still robust in the
slice it is given, so its random starts depend on how the set was split. Its outcome rarely hinges
on the start: on the test models the masks were identical for 1, 2 and 3 processes (and across
AutoAttack seeds), but only a difference of a few images is promised.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from pipeline import robust
from pipeline.config import AutoAttackVersion, EvaluateConfig
from pipeline.errors import UserError, check_out, refuse_non_finite
from pipeline.models import load_classifier
from pipeline.runtime import Dist
from pipeline.shards import read_split


def check_config(cfg: EvaluateConfig) -> None:
    refuse_non_finite(cfg)
    if cfg.n <= 0:
        raise UserError(f"--n must be positive, got {cfg.n}")
    if not 0 < cfg.eps <= 1:
        raise UserError(f"--eps must be in (0, 1] (images are in [0, 1]), got {cfg.eps}")
    if cfg.pgd_steps < 1 or cfg.pgd_restarts < 1:
        raise UserError("--pgd-steps and --pgd-restarts must be >= 1")
    if cfg.pgd_step_size < 0 or min(cfg.batch_size, cfg.check_n, cfg.fast_targets, cfg.fast_iters) < 1:
        raise UserError("--pgd-step-size must be >= 0; --batch-size, --check-n, --fast-targets, "
                        "--fast-iters >= 1")
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith("cuda"):
        raise UserError(f"--device must be auto, cpu or cuda[:N], got {cfg.device!r}")
    check_out(cfg.out, folder=False)
    check_out(str(metrics_path(cfg)), folder=False, flag="--metrics")


def metrics_path(cfg: EvaluateConfig) -> Path:
    out = Path(cfg.out)
    return Path(cfg.metrics) if cfg.metrics else out.with_name(out.stem + ".metrics.json")


def load_test_images(shards: str, n: int, image_shape: tuple, num_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first n test images as float (N,C,H,W) in [0,1], refusing a shape/class mismatch."""
    split = read_split(shards, limit=n)
    h, w, c = split.images.shape[1:]
    if (c, h, w) != tuple(image_shape):
        raise UserError(f"{shards}: images are {c}x{h}x{w}, the checkpoint expects "
                        f"{'x'.join(map(str, image_shape))}")
    if split.labels.max() >= num_classes:
        raise UserError(f"{shards}: label {split.labels.max()} but the checkpoint has {num_classes} classes")
    x = torch.from_numpy(split.images).permute(0, 3, 1, 2).float() / 255.0
    return x.contiguous(), torch.from_numpy(split.labels)


def read_train_metrics(folder: Path) -> dict:
    """The training stage's final metrics (train time etc.), if it wrote them; {} otherwise."""
    try:
        data = json.loads((folder / "metrics.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def pick_device(requested: str, dist: Dist) -> str:
    """--device resolved for this process; with several processes each uses its own GPU."""
    # important: accelerate's CPU device is "cpu:0", which safetensors refuses
    local = str(dist.device) if dist.device.type == "cuda" else "cpu"
    if requested == "auto":
        return local
    if dist.world > 1 and requested != "cpu":
        if dist.device.type != "cuda":
            raise UserError(f"--device {requested}, but no CUDA device is available")
        return local
    return requested


def run(cfg: EvaluateConfig) -> dict:
    check_config(cfg)
    start = time.perf_counter()
    dist = Dist()
    device = pick_device(cfg.device, dist)
    model, mcfg = load_classifier(cfg.checkpoint, device=device)
    shape = (int(mcfg["in_channels"]), int(mcfg["image_size"]), int(mcfg["image_size"]))
    # every process reads and checks all N images, so bad input is refused by all of them alike
    x, y = load_test_images(cfg.shards, cfg.n, shape, int(mcfg["num_classes"]))
    n = len(y)
    lo, hi = robust.split_range(n, dist.rank, dist.world)
    xs, ys = x[lo:hi].to(device), y[lo:hi].to(device)
    torch.manual_seed(cfg.seed)
    alpha = cfg.pgd_step_size or 2.5 * cfg.eps / cfg.pgd_steps
    bs, timings = cfg.batch_size, {}

    def timed(name: str, fn):  # noqa: ANN001, ANN202 - tiny local helper
        t0 = time.perf_counter()
        value = fn()
        timings[name] = round(time.perf_counter() - t0, 2)
        return value

    xc, yc = x[:cfg.check_n].to(device), y[:cfg.check_n].to(device)
    checks = robust.model_checks(model, xc, yc) if dist.is_main else {}
    clean = timed("clean", lambda: robust.clean_correct(model, xs, ys, batch_size=bs))
    pgd_ok, pgd_stats = timed("pgd", lambda: robust.pgd_correct(
        model, xs, ys, eps=cfg.eps, alpha=alpha, steps=cfg.pgd_steps, restarts=cfg.pgd_restarts,
        batch_size=bs, seed=cfg.seed, offset=lo))
    aa_ok, aa_stats, attacks = None, None, [f"pgd-ce-{cfg.pgd_steps}x{cfg.pgd_restarts}"]
    if cfg.autoattack != AutoAttackVersion.none:
        aa_ok, aa_stats, aa_attacks = timed("autoattack", lambda: robust.autoattack_correct(
            model, xs, ys, eps=cfg.eps, version=cfg.autoattack, fast_targets=cfg.fast_targets,
            fast_iters=cfg.fast_iters, batch_size=bs, seed=cfg.seed))
        attacks += [f"autoattack-{cfg.autoattack.value}:{a}" for a in aa_attacks]
    parts = dist.gather({"clean": clean.cpu(), "pgd": pgd_ok.cpu(), "pgd_stats": pgd_stats,
                         "aa": None if aa_ok is None else aa_ok.cpu(), "aa_stats": aa_stats,
                         "timings": timings})
    if not dist.is_main:
        dist.barrier()  # leave with rank 0: see the end
        return {}
    timings = {k: max(p["timings"][k] for p in parts) for k in timings}  # the slowest process
    clean, pgd_ok = torch.cat([p["clean"] for p in parts]), torch.cat([p["pgd"] for p in parts])
    assert len(clean) == len(pgd_ok) == n, "the slices must cover the test set exactly once"
    pgd_stats = robust.merge_stats([p["pgd_stats"] for p in parts])
    aa_acc = None
    if aa_ok is not None:
        aa_acc = int(torch.cat([p["aa"] for p in parts]).sum()) / n
        aa_stats = robust.merge_stats([p["aa_stats"] for p in parts])
    checks["training_finished"] = bool(mcfg.get("finished", True))  # train marks a complete run
    big = timed("large_eps", lambda: robust.large_eps_accuracy(model, xc, yc, seed=cfg.seed))
    clean_acc, pgd_acc = int(clean.sum()) / n, int(pgd_ok.sum()) / n  # exact fractions
    checks.update(robust.result_checks(clean=clean_acc, pgd_acc=pgd_acc, aa_acc=aa_acc, eps=cfg.eps,
                                       pgd_stats=pgd_stats, aa_stats=aa_stats, big_eps_acc=big))
    warnings = robust.failed(checks)
    result = {
        "variant": cfg.name or Path(cfg.checkpoint).name,
        "clean": clean_acc, "pgd": pgd_acc, "autoattack": aa_acc, "n": n, "processes": dist.world,
        "threat_model": "Linf", "eps": cfg.eps, "attacks": attacks,
        "pgd_attack": {"steps": cfg.pgd_steps, "restarts": cfg.pgd_restarts, "step_size": alpha,
                       "loss": "ce", "random_start": True},
        "autoattack_version": cfg.autoattack.value,
        "autoattack_fast": ({"targets": cfg.fast_targets, "iters": cfg.fast_iters}
                            if cfg.autoattack == AutoAttackVersion.fast else None),
        "checks": checks, "warnings": warnings,
        "checkpoint": str(cfg.checkpoint), "shards": str(cfg.shards),
        "train_config": mcfg, "train_metrics": read_train_metrics(Path(cfg.checkpoint)),
        "device": device, "seed": cfg.seed, "timings": timings,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(Path(cfg.out), result)
    flat = {k: result[k] for k in ("clean", "pgd", "autoattack", "n", "eps", "seconds")}
    flat["checks_passed"] = not warnings
    write_json(metrics_path(cfg), flat)
    aa_txt = "-" if aa_acc is None else f"{aa_acc:.4f}"
    print(f"{result['variant']}: clean {clean_acc:.4f}  pgd {pgd_acc:.4f}  autoattack {aa_txt}  "
          f"(n={n}{f', {dist.world} processes' if dist.world > 1 else ''}, eps={cfg.eps}, "
          f"{result['seconds']:.0f} s) -> {cfg.out}")
    for w in warnings:
        print(f"warning: check failed: {w} (see 'checks' in {cfg.out})")
    # important: a process that exits while another still works can abort in the process group's
    # teardown ("terminate called without an active exception"), and the launcher then kills rank 0
    dist.barrier()
    return result

"""Stage `evaluate`: clean, PGD and AutoAttack accuracy of a checkpoint (its EMA weights).

Recipe: load the checkpoint (or, with ``--robustbench NAME``, a RobustBench model-zoo entry from a
local folder: pipeline/evaluate/robustbench.py) and the first N test images, check the model (eval mode,
deterministic logits, non-zero input gradients), measure clean accuracy, PGD-CE with restarts
(worst case over restarts), AutoAttack (Linf), and a large-eps PGD that must break the model.
Writes the full result JSON (threat model, eps, attacks, n, checks, timings) and a flat metrics
JSON for ``dvc metrics show``, both atomically. Progress on stderr: a bar per attack (PGD, then
each AutoAttack attack) with the images done, of how many, and the running robust accuracy.

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

import time
from pathlib import Path

import torch

from pipeline.classifiers.zoo import MODEL_FILE, load_classifier
from pipeline.core.runtime import Dist
from pipeline.core.shards import file_sha256
from pipeline.evaluate import robust
from pipeline.evaluate.config import AutoAttackVersion, EvaluateConfig
from pipeline.evaluate.inputs import (
    attack_budget,
    check_config,
    load_test_images,
    metrics_path,
    pick_device,
    read_train_metrics,
    write_json,
)
from pipeline.evaluate.robustbench import load_zoo_model


def run_metrics(checkpoint: Path, mcfg: dict) -> dict:
    """The training run's metrics: its budget and time. A best-validation checkpoint (``OUT/best``,
    its config names the epoch) is a model of the run in OUT, so OUT's metrics, with the epoch chosen."""
    if isinstance(mcfg.get("best"), dict) and not (checkpoint / "metrics.json").exists():
        run = read_train_metrics(checkpoint.parent)
        if not run or {k: (run.get("best") or {}).get(k) for k in ("epoch", "val_pgd")} != {
                k: mcfg["best"].get(k) for k in ("epoch", "val_pgd")}:
            return {}  # the folder above holds another run (or an unfinished one): no budget is claimed
        return {**run, "checkpoint": {"best_epoch": mcfg["best"].get("epoch"), "of": run.get("epochs")}}
    return read_train_metrics(checkpoint)


def run(cfg: EvaluateConfig) -> dict:
    check_config(cfg)
    start = time.perf_counter()
    dist = Dist()
    device = pick_device(cfg.device, dist)
    if cfg.robustbench:  # a zoo model: RobustBench's loader, its leaderboard eps unless --eps
        model, mcfg, weights = load_zoo_model(cfg.robustbench, cfg.model_dir, cfg.dataset, cfg.threat_model, device)
        eps, eps_source = (cfg.eps, "--eps") if cfg.eps else (mcfg["eps"], f"RobustBench {cfg.dataset} {cfg.threat_model}")
    else:
        model, mcfg = load_classifier(cfg.checkpoint, device=device)
        weights = Path(cfg.checkpoint) / MODEL_FILE
        eps, eps_source = attack_budget(cfg.eps, mcfg, cfg.checkpoint)  # --eps, or the training eps
    shape = (int(mcfg["in_channels"]), int(mcfg["image_size"]), int(mcfg["image_size"]))
    # every process reads and checks all N images, so bad input is refused by all of them alike
    x, y = load_test_images(cfg.shards, cfg.n, shape, int(mcfg["num_classes"]), offset=cfg.offset,
                            trained_on=mcfg.get("trained_on"))
    n = len(y)
    lo, hi = robust.split_range(n, dist.rank, dist.world)
    xs, ys = x[lo:hi].to(device), y[lo:hi].to(device)
    torch.manual_seed(cfg.seed)
    alpha = cfg.pgd_step_size or 2.5 * eps / cfg.pgd_steps
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
        model, xs, ys, eps=eps, alpha=alpha, steps=cfg.pgd_steps, restarts=cfg.pgd_restarts,
        batch_size=bs, seed=cfg.seed, offset=lo, progress=dist.is_main))
    aa_ok, aa_stats, attacks = None, None, [f"pgd-ce-{cfg.pgd_steps}x{cfg.pgd_restarts}"]
    aa_n = min(cfg.autoattack_n or n, n)  # AutoAttack: the first aa_n images (a short split: all), this process's share
    aa_here = max(0, min(hi, aa_n) - lo)
    if cfg.autoattack != AutoAttackVersion.none:
        aa_ok, aa_stats, aa_attacks = timed("autoattack", lambda: robust.autoattack_correct(
            model, xs[:aa_here], ys[:aa_here], eps=eps, version=cfg.autoattack, fast_targets=cfg.fast_targets,
            fast_iters=cfg.fast_iters, batch_size=bs, seed=cfg.seed, progress=dist.is_main))
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
        aa_all = torch.cat([p["aa"] for p in parts])
        assert len(aa_all) == aa_n, "the slices must cover AutoAttack's images exactly once"
        aa_acc = int(aa_all.sum()) / aa_n
        aa_stats = robust.merge_stats([p["aa_stats"] for p in parts])
    train_metrics = {} if cfg.robustbench else run_metrics(Path(cfg.checkpoint), mcfg)
    # train marks a complete run; a best-validation checkpoint is complete once its run is (its metrics)
    checks["training_finished"] = bool(mcfg.get("finished", True)) and (
        not isinstance(mcfg.get("best"), dict) or bool(train_metrics))
    big = timed("large_eps", lambda: robust.large_eps_accuracy(model, xc, yc, seed=cfg.seed))
    clean_acc, pgd_acc = int(clean.sum()) / n, int(pgd_ok.sum()) / n  # exact fractions
    # AutoAttack's bounds are checked on its own images: clean and PGD accuracy of those aa_n
    sub = (int(clean[:aa_n].sum()) / aa_n, int(pgd_ok[:aa_n].sum()) / aa_n)
    checks.update(robust.result_checks(clean=clean_acc, pgd_acc=pgd_acc, aa_acc=aa_acc, eps=eps, aa_bounds=sub,
                                       pgd_stats=pgd_stats, aa_stats=aa_stats, big_eps_acc=big))
    warnings = robust.failed(checks)
    result = {
        "variant": cfg.name or cfg.robustbench or Path(cfg.checkpoint).name,
        "clean": clean_acc, "pgd": pgd_acc, "autoattack": aa_acc, "n": n, "processes": dist.world,
        "autoattack_n": aa_n if aa_acc is not None else None,
        "threat_model": "Linf", "eps": eps, "eps_source": eps_source, "attacks": attacks,
        "pgd_attack": {"steps": cfg.pgd_steps, "restarts": cfg.pgd_restarts, "step_size": alpha,
                       "loss": "ce", "random_start": True},
        "autoattack_version": cfg.autoattack.value,
        "autoattack_fast": ({"targets": cfg.fast_targets, "iters": cfg.fast_iters}
                            if cfg.autoattack == AutoAttackVersion.fast else None),
        "checks": checks, "warnings": warnings,
        "checkpoint": str(weights if cfg.robustbench else cfg.checkpoint), "shards": str(cfg.shards),
        "offset": cfg.offset,
        # the weights measured: report refuses this result once the run folder holds other ones
        "checkpoint_sha256": file_sha256(weights),
        "train_config": mcfg, "train_metrics": train_metrics,
        "device": device, "seed": cfg.seed, "timings": timings,
        "seconds": round(time.perf_counter() - start, 2),
    }
    write_json(Path(cfg.out), result)
    flat = {k: result[k] for k in ("clean", "pgd", "autoattack", "n", "offset", "eps", "seconds")}
    flat["checks_passed"] = not warnings
    write_json(metrics_path(cfg), flat)
    aa_txt = "-" if aa_acc is None else f"{aa_acc:.4f}"
    print(f"{result['variant']}: clean {clean_acc:.4f}  pgd {pgd_acc:.4f}  autoattack {aa_txt}  "
          f"(n={n}{f', AutoAttack on the first {aa_n}' if aa_acc is not None and aa_n < n else ''}"
          f"{f', {dist.world} processes' if dist.world > 1 else ''}, eps={eps:.6g} from {eps_source}, "
          f"{result['seconds']:.0f} s) -> {cfg.out}")
    for w in warnings:
        print(f"warning: check failed: {w} (see 'checks' in {cfg.out})")
    # important: a process that exits while another still works can abort in the process group's
    # teardown ("terminate called without an active exception"), and the launcher then kills rank 0
    dist.barrier()
    return result

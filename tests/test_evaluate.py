"""evaluate: the accuracies are ordered, the sanity checks catch broken models, bad input is refused.

A small CNN is trained for a few plain (non-adversarial) steps on real Fashion-MNIST: clean
accuracy is well above chance, and eps = 0.1 breaks most of it, so every attack has work to do.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from pipeline.classifiers.zoo import build_classifier, save_checkpoint
from pipeline.core.errors import UserError
from pipeline.core.shards import read_split
from pipeline.evaluate import robust
from pipeline.evaluate.config import AutoAttackVersion, EvaluateConfig
from stages import evaluate

ROOT = Path(__file__).resolve().parents[1]


def _tensors(split_dir: Path, n: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    s = read_split(split_dir, limit=n)
    return torch.from_numpy(s.images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(s.labels)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, fmnist_shards) -> Path:
    """A SmallCNN after 120 plain Adam steps on 512 real images (clean accuracy ~70%)."""
    torch.manual_seed(0)
    x, y = _tensors(fmnist_shards / "train")
    model = build_classifier("cnn", 1, 10, 28)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(120):
        idx = torch.randint(0, len(x), (64,))
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():  # important: BatchNorm running stats of the final weights
        for i in range(0, len(x), 64):
            model(x[i:i + 64])
    folder = tmp_path_factory.mktemp("ckpt") / "at"
    save_checkpoint(folder, model, {"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 28,
                                    "seed": 3, "dra_weight": 0.0})
    (folder / "metrics.json").write_text(json.dumps({"train_seconds": 12.5}))
    return folder


def _cfg(checkpoint: Path, shards: Path, out: Path, **kw) -> EvaluateConfig:
    # eps given: this checkpoint is not a `train` run's and records no training eps
    base = dict(checkpoint=str(checkpoint), shards=str(shards / "test"), out=str(out / "at.json"),
                n=128, eps=0.1, pgd_steps=5, pgd_restarts=2, batch_size=64, check_n=64, fast_iters=20)
    return EvaluateConfig(**(base | kw))


def test_evaluate_writes_ordered_accuracies_and_passing_checks(checkpoint, fmnist_shards, tmp_path):
    res = evaluate.run(_cfg(checkpoint, fmnist_shards, tmp_path, autoattack=AutoAttackVersion.fast))
    saved = json.loads((tmp_path / "at.json").read_text())
    assert saved["clean"] == res["clean"] and saved["n"] == 128
    assert saved["clean"] > 0.5, "the tiny model should have learned something"
    assert 0.0 <= saved["autoattack"] <= saved["pgd"] <= saved["clean"]
    assert saved["pgd"] < saved["clean"], "eps=0.1 must break some points of a non-robust model"
    assert saved["threat_model"] == "Linf" and saved["eps"] == 0.1
    assert saved["pgd_attack"]["steps"] == 5 and saved["pgd_attack"]["restarts"] == 2
    assert any("apgd-t" in a for a in saved["attacks"])
    assert saved["warnings"] == [], saved["checks"]
    for key in ("eval_mode", "deterministic", "nonzero_input_gradients", "outputs_are_logits",
                "autoattack_le_pgd", "pgd_in_eps_ball", "autoattack_in_eps_ball", "large_eps_breaks_model"):
        assert saved["checks"][key] is True, key
    assert saved["train_metrics"] == {"train_seconds": 12.5}
    assert saved["train_config"]["seed"] == 3 and saved["variant"] == "at"
    flat = json.loads((tmp_path / "at.metrics.json").read_text())
    assert set(flat) >= {"clean", "pgd", "autoattack", "n"}
    assert all(not isinstance(v, (dict, list)) for v in flat.values())
    assert not list(tmp_path.glob("*.tmp"))


def test_autoattack_on_the_first_m_images_is_autoattack_of_those_m_and_pgd_stays_over_n(checkpoint, fmnist_shards,
                                                                                         tmp_path):
    """``--autoattack-n 64`` of ``--n 128``: clean and PGD over all 128 (as without AutoAttack), the
    AutoAttack accuracy that of an evaluation of the first 64 alone, its bound checks on those 64;
    the table names the subset; a subset larger than N is refused."""
    from pipeline.report.tables import markdown

    fast = dict(autoattack=AutoAttackVersion.fast, fast_targets=2)
    part = evaluate.run(_cfg(checkpoint, fmnist_shards, tmp_path / "part", autoattack_n=64, **fast))
    small = evaluate.run(_cfg(checkpoint, fmnist_shards, tmp_path / "small", n=64, **fast))
    whole = evaluate.run(_cfg(checkpoint, fmnist_shards, tmp_path / "whole", autoattack=AutoAttackVersion.none))
    assert (part["n"], part["autoattack_n"], small["autoattack_n"], whole["autoattack_n"]) == (128, 64, 64, None)
    assert (part["clean"], part["pgd"]) == (whole["clean"], whole["pgd"])
    assert part["autoattack"] == small["autoattack"] and part["warnings"] == []
    assert part["checks"]["autoattack_le_pgd"] is part["checks"]["autoattack_le_clean"] is True
    part["_path"] = "part.json"
    assert "on the first 128 test images (AutoAttack on the first 64 of them)" in markdown({"AT": [part]}, [])
    with pytest.raises(UserError, match=r"--autoattack-n must be in \[0, --n = 128\], got 129"):
        _cfg(checkpoint, fmnist_shards, tmp_path, autoattack_n=129).validate()


def test_pgd_grows_with_eps_and_restarts_are_worst_case(checkpoint, fmnist_shards):
    model = evaluate.load_classifier(checkpoint)[0]
    x, y = _tensors(fmnist_shards / "test", 96)
    clean = robust.clean_correct(model, x, y)
    tiny, _ = robust.pgd_correct(model, x, y, eps=1e-4, alpha=5e-5, steps=3, restarts=1)
    one, stats = robust.pgd_correct(model, x, y, eps=0.05, alpha=0.0125, steps=5, restarts=1)
    three, _ = robust.pgd_correct(model, x, y, eps=0.05, alpha=0.0125, steps=5, restarts=3)
    assert tiny.sum() >= clean.sum() - 2  # a negligible budget changes (almost) nothing
    assert (one & ~clean).sum() == 0 and (three & ~clean).sum() == 0  # robust implies correct
    assert three.sum() <= one.sum() < clean.sum()
    assert stats["max_linf"] <= 0.05 + 1e-6 and stats["in_range"]


class _Masked(nn.Module):
    """Gradient masking by quantisation: round() has zero gradient almost everywhere."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(torch.round(x * 8) / 8)


class _Noisy(nn.Module):
    """A randomised model left in train mode (dropout): non-deterministic logits."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner, self.drop = inner, nn.Dropout(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(self.drop(x))


def test_checks_flag_masked_gradients_and_randomness(checkpoint, fmnist_shards):
    model = evaluate.load_classifier(checkpoint)[0]
    x, y = _tensors(fmnist_shards / "test", 32)
    assert robust.failed(robust.model_checks(model, x, y)) == []
    masked = robust.model_checks(_Masked(model).eval(), x, y)
    assert masked["nonzero_input_gradients"] is False and masked["zero_gradient_points"] == 32
    noisy = robust.model_checks(_Noisy(model).train(), x, y)
    assert {"eval_mode", "deterministic"} <= set(robust.failed(noisy))
    assert robust.large_eps_accuracy(model, x, y, steps=10) <= 0.05  # eps 0.5 breaks a sound model
    bad = robust.result_checks(clean=0.8, pgd_acc=0.9, aa_acc=0.95, eps=0.1, big_eps_acc=0.5,
                               pgd_stats={"max_linf": 0.2, "in_range": True},
                               aa_stats={"max_linf": 0.1, "in_range": False})
    assert set(robust.failed(bad)) == {"pgd_le_clean", "autoattack_le_clean", "autoattack_le_pgd",
                                       "pgd_in_eps_ball", "autoattack_in_eps_ball", "large_eps_breaks_model"}


def test_standard_autoattack_on_a_few_points(checkpoint, fmnist_shards, capsys):
    """Standard AutoAttack with its per-attack bars, as `evaluate` runs it: the bars name every attack
    that ran (FAB and Square included: points survive APGD at this small eps)."""
    model = evaluate.load_classifier(checkpoint)[0]
    x, y = _tensors(fmnist_shards / "test", 8)
    ok, stats, attacks = robust.autoattack_correct(model, x, y, eps=0.03, version=AutoAttackVersion.standard,
                                                   batch_size=8, progress=True)
    assert attacks == ["apgd-ce", "apgd-t", "fab-t", "square"]
    bars = capsys.readouterr().err
    assert all(f"autoattack {a}" in bars for a in attacks), bars[-500:]
    assert ok.sum() <= robust.clean_correct(model, x, y).sum()
    assert stats["max_linf"] <= 0.03 + 1e-6 and stats["in_range"]


def test_bad_input_is_refused_before_work(checkpoint, fmnist_shards, tmp_path):
    with pytest.raises(UserError, match="not a checkpoint"):
        evaluate.run(_cfg(tmp_path / "nope", fmnist_shards, tmp_path))
    with pytest.raises(UserError, match="--n"):
        evaluate.run(_cfg(checkpoint, fmnist_shards, tmp_path, n=0))
    with pytest.raises(UserError, match="eps"):
        evaluate.run(_cfg(checkpoint, fmnist_shards, tmp_path, eps=8))
    rgb = tmp_path / "rgb"
    save_checkpoint(rgb, build_classifier("cnn", 3, 10, 32),
                    {"arch": "cnn", "in_channels": 3, "num_classes": 10, "image_size": 32})
    with pytest.raises(UserError, match="expects 3x32x32"):
        evaluate.run(_cfg(rgb, fmnist_shards, tmp_path))
    assert not (tmp_path / "at.json").exists()


def test_cli_one_line_error(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "evaluate", "--checkpoint", str(tmp_path / "x"),
                           "--out", str(tmp_path / "e.json")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1


def test_pgd_masks_do_not_depend_on_the_split(checkpoint, fmnist_shards):
    """Slices with offsets (a boundary inside a batch, an empty slice) give the one-pass masks.

    Exact on any CPU: the slices form other batches (sizes 1, 2, 33), and fp32 kernels may round a
    sample differently in another batch shape, which could flip a margin point. In float64 such
    rounding (~1e-16) cannot move an argmax or a gradient sign here, so only the seeding decides.
    """
    model = evaluate.load_classifier(checkpoint)[0].double()
    x, y = _tensors(fmnist_shards / "test", 100)
    x = x.double()
    # one short step: the outcome hinges on the random start, so a start that moved would show
    kw = dict(eps=0.15, alpha=0.01, steps=1, restarts=2, batch_size=32, seed=7)
    whole, stats = robust.pgd_correct(model, x, y, **kw)
    other_seed, _ = robust.pgd_correct(model, x, y, **(kw | {"seed": 8}))
    assert 0 < whole.sum() < robust.clean_correct(model, x, y).sum() and not torch.equal(whole, other_seed)
    bounds = [robust.split_range(100, r, 3) for r in range(3)]
    assert bounds == [(0, 33), (33, 66), (66, 100)]
    for cuts in (bounds, [(0, 37), (37, 37), (37, 100)]):
        parts = [robust.pgd_correct(model, x[a:b], y[a:b], offset=a, **kw) for a, b in cuts]
        assert torch.equal(torch.cat([m for m, _ in parts]), whole), cuts
        assert robust.merge_stats([s for _, s in parts]) == stats


def test_two_processes_split_the_set_and_match_one(checkpoint, fmnist_shards, tmp_path):
    """accelerate launch, 2 CPU processes: halves gathered on rank 0; clean and PGD equal 1 process.

    Depends on: the processor and the threads per process (1 in both runs), and on the batches: with
    n = 2 x batch size the halves are whole batches of the one-process run, so every forward sees the
    same batch (slices that cut a batch are tested in float64 above).
    """
    args = ["--checkpoint", str(checkpoint), "--shards", str(fmnist_shards / "test"), "--n", "96",
            "--batch-size", "48", "--check-n", "32", "--eps", "0.15", "--autoattack", "fast", "--fast-targets", "2",
            "--fast-iters", "10", "--seed", "1",
            # one short PGD step: the outcome hinges on the random starts, so starts that depend on
            # the split (rank 1 draws them for global rows 48..95) would show as a different figure
            "--pgd-steps", "1", "--pgd-step-size", "0.01", "--pgd-restarts", "2"]
    one, two = tmp_path / "one", tmp_path / "two"
    # the reference is a plain process, which must not even import accelerate
    code = ("import sys; from pipeline.cli import main; main(sys.argv[1:]); "
            "assert 'accelerate' not in sys.modules, 'a single process imported accelerate'")
    proc = subprocess.run([sys.executable, "-c", code, "evaluate", *args, "--out", str(one / "at.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-2000:]
    from launch import accelerate_launch

    proc = accelerate_launch(["evaluate", *args, "--out", two / "at.json"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    a, b = (json.loads((d / "at.json").read_text()) for d in (one, two))
    assert (a["processes"], b["processes"]) == (1, 2) and a["n"] == b["n"] == 96
    assert b["clean"] == a["clean"] and b["pgd"] == a["pgd"]
    assert 0 < b["pgd"] < b["clean"], "PGD must break some points but not all, or the comparison says nothing"
    assert b["autoattack"] is not None and abs(b["autoattack"] - a["autoattack"]) <= 0.03
    assert b["checks"] == a["checks"] and b["warnings"] == []
    assert proc.stdout.count(" -> ") == 1, proc.stdout  # rank 0 alone reports (and writes)
    assert sorted(p.name for p in two.iterdir()) == ["at.json", "at.metrics.json"]
    assert json.loads((two / "at.metrics.json").read_text())["pgd"] == a["pgd"]


SCHEDULE = ("n_iter", "n_iter_orig", "n_iter_2", "n_iter_min", "size_decr", "n_restarts", "eot_iter", "thr_decr",
            "eps", "norm", "seed", "loss")


@pytest.mark.parametrize("iters", [50, 20, 100])
def test_fast_autoattack_schedule_is_that_of_its_iteration_count(checkpoint, iters):
    """APGD derives its checkpoints from n_iter in __init__ (fra31/auto-attack autopgd_base.py):
    the fast attack must equal a freshly constructed APGD with the same n_iter, not a 100-step one
    whose n_iter was overwritten."""
    from pyautoattack.autopgd_base import APGDAttack, APGDAttack_targeted

    model = evaluate.load_classifier(checkpoint)[0]
    aa = robust.make_autoattack(model, eps=0.1, version=AutoAttackVersion.fast, fast_targets=3, fast_iters=iters,
                                seed=4)
    assert aa.attacks_to_run == ["apgd-ce", "apgd-t"]
    fresh = APGDAttack(model, n_iter=iters, eps=0.1, seed=4, n_restarts=1)
    fresh_t = APGDAttack_targeted(model, n_iter=iters, eps=0.1, seed=4, n_restarts=1, n_target_classes=3)
    for name in SCHEDULE:
        assert getattr(aa.apgd, name) == getattr(fresh, name), name
        assert getattr(aa.apgd_targeted, name) == getattr(fresh_t, name), name
    assert aa.apgd_targeted.n_target_classes == 3
    if iters != 100:  # what overwriting n_iter on a 100-iteration attack leaves behind
        stale = APGDAttack(model, n_iter=100, eps=0.1)
        stale.n_iter = iters
        assert (stale.n_iter_2, stale.size_decr) != (fresh.n_iter_2, fresh.size_decr)


def test_a_validation_slice_of_the_train_split_never_overlaps_training(store, fmnist_shards, tmp_path):
    """--offset evaluates images [offset, offset + n): tuning reads held-out train images, and a
    slice that reaches into the rows the checkpoint trained on is refused."""
    from reliability_helpers import train_cfg

    from stages import train

    ckpt = tmp_path / "run"
    train.run(train_cfg(store, ckpt, max_steps=2))
    meta = evaluate.load_classifier(ckpt)[1]
    train_hash = read_split(fmnist_shards / "train", limit=1).fingerprint["content_hash"]
    assert meta["trained_on"] == {train_hash: 64}  # the store's train part: the first 64 images
    def val(offset: int) -> EvaluateConfig:
        return replace(_cfg(ckpt, fmnist_shards, tmp_path, n=96, check_n=32, autoattack=AutoAttackVersion.none,
                            offset=offset), shards=str(fmnist_shards / "train"))

    with pytest.raises(UserError, match=r"images \[10, 106\) overlap the first 64 images .*--offset 64"):
        evaluate.run(val(10))
    with pytest.raises(UserError, match="--offset 512 is past the 512 images"):
        evaluate.run(val(512))
    assert not (tmp_path / "at.json").exists()
    res = evaluate.run(val(64))
    x, y = _tensors(fmnist_shards / "train", 160)
    model = evaluate.load_classifier(ckpt)[0]
    assert res["n"] == 96 and res["offset"] == 64
    assert res["clean"] == int(robust.clean_correct(model, x[64:], y[64:]).sum()) / 96  # exactly those images


@pytest.mark.parametrize("record", [["abc"], {"abc": -1}, {"abc": "64"}, {"abc": 1.5}, {"abc": True}, {1: 64}])
def test_a_malformed_trained_on_record_is_refused(fmnist_shards, record):
    """A checkpoint that cannot say which images it trained on cannot vouch for a held-out slice."""
    from pipeline.evaluate.inputs import load_test_images

    with pytest.raises(UserError, match="trained_on record is malformed"):
        load_test_images(str(fmnist_shards / "train"), 8, (1, 28, 28), 10, offset=100, trained_on=record)
    x, y = load_test_images(str(fmnist_shards / "train"), 8, (1, 28, 28), 10, offset=100, trained_on={"abc": 64})
    assert x.shape == (8, 1, 28, 28) and y.shape == (8,)


def test_progress_is_a_bar_per_attack_ending_at_its_accuracy(checkpoint, fmnist_shards, tmp_path, capsys):
    """On stderr, a bar per attack: images done / total and the running robust accuracy. The PGD bar
    and the last AutoAttack bar end at the accuracies the result reports; each AutoAttack bar's
    total is the images still robust when that attack began."""
    import re

    from pipeline.cli import main

    out = tmp_path / "eval.json"
    main(["evaluate", "--checkpoint", str(checkpoint), "--shards", str(fmnist_shards / "test"), "--out", str(out),
          "--n", "64", "--eps", "0.03", "--pgd-steps", "3", "--pgd-restarts", "2", "--fast-iters", "5",
          "--batch-size", "32", "--check-n", "16"])
    err, res = capsys.readouterr().err, json.loads(out.read_text())
    bars = {}  # attack -> (done, total, accuracy) at its last refresh
    for line in err.replace("\r", "\n").splitlines():
        if m := re.match(r"(pgd-3x2|autoattack [\w-]+):.*\| *(\d+)/(\d+) .*acc=([\d.]+)", line):
            bars[m[1]] = (int(m[2]), int(m[3]), float(m[4]))
    assert bars["pgd-3x2"] == (64, 64, round(res["pgd"], 3)), err
    assert list(bars)[1:] == ["autoattack apgd-ce", "autoattack apgd-t"], err
    assert bars["autoattack apgd-ce"][1] == round(res["clean"] * 64) > bars["autoattack apgd-t"][1], err
    assert all(done == total for done, total, _ in bars.values()) and bars["autoattack apgd-t"][2] == round(
        res["autoattack"], 3), err
    assert res["clean"] > res["pgd"] > 0, res  # the bars had something to count

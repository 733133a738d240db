"""Stage `generate` on a tiny UNet: determinism, shards like `prepare`'s, labels, refusals."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from repro import assert_images_close, torch_threads, tree_bytes

from pipeline.cli import main
from pipeline.core.errors import UserError
from pipeline.core.shards import read_split
from pipeline.diffusion.model import load_model, make_scheduler, tiny_unet
from pipeline.generate.config import GenerateConfig
from pipeline.generate.sampling import class_grid, sample
from stages import generate


@pytest.fixture(scope="module")
def cond_dir(tiny_model_dir) -> Path:
    return tiny_model_dir


@pytest.fixture(scope="module")
def uncond_dir(tmp_path_factory) -> Path:
    torch.manual_seed(1)
    out = tmp_path_factory.mktemp("uncond")
    tiny_unet(28, 1, None).save_pretrained(out)  # hub-root layout, like google/ddpm-cifar10-32
    make_scheduler().save_pretrained(out)
    return out


def cfg(model: Path, shards: Path, out: Path, **kw) -> GenerateConfig:
    base = GenerateConfig(model=str(model), real_train=str(shards / "train"), real_test=str(shards / "test"),
                          out=str(out), n=24, sample_steps=3, batch_size=8, shard_size=10, bf16=False,
                          classifier_arch="cnn", classifier_epochs=1, seed=3)
    return replace(base, **kw)


@pytest.mark.parametrize("sampler", ["ddim", "dpm"])
def test_same_seed_same_images(cond_dir, sampler):
    m = load_model(str(cond_dir))
    y = torch.tensor([0, 1, 2, 3])
    a = sample(m, range(4), y, seed=5, sampler=sampler, steps=3, bf16=False)
    b = sample(m, range(4), y, seed=5, sampler=sampler, steps=3, bf16=False)
    c = sample(m, range(4), y, seed=6, sampler=sampler, steps=3, bf16=False)
    assert a.dtype == np.uint8 and a.shape == (4, 28, 28, 1)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    # a sample depends on its index, not its batch: samples 2,3 alone equal rows 2,3 above
    d = sample(m, range(2, 4), y[2:], seed=5, sampler=sampler, steps=3, bf16=False)
    assert np.abs(d.astype(int) - a[2:].astype(int)).max() <= 1
    g = sample(m, range(4), y, seed=5, sampler=sampler, steps=3, guidance=2.0, bf16=False)
    assert not np.array_equal(a, g)


def test_stage_conditional(cond_dir, fmnist_shards, tmp_path):
    out = tmp_path / "syn"
    report = generate.run(cfg(cond_dir, fmnist_shards, out, classifier_epochs=6))
    data = read_split(out / "train")  # checks shard sha256 and the content hash
    real = read_split(fmnist_shards / "train")
    assert data.keys[:2] == ["syn-train-0000000", "syn-train-0000001"] and len(data.keys) == 24
    assert data.images.shape[1:] == real.images.shape[1:] and data.images.dtype == np.uint8
    assert np.bincount(data.labels).tolist() == [3, 3, 3, 3] + [2] * 6  # class-balanced: i mod 10
    fp = data.fingerprint
    assert fp["classes"] == real.fingerprint["classes"] and fp["split"] == "train"
    assert set(real.fingerprint) <= set(fp) and len(fp["shards"]) == 3
    assert fp["synthetic"]["weights_sha256"] == load_model(str(cond_dir)).weights_sha256
    assert (out / "grid.png").stat().st_size > 1000
    saved = json.loads((out / "generate.json").read_text())
    assert saved["agreement"] == report["agreement"] and 0 <= saved["agreement"] <= 1
    assert saved["precision"] in ("bf16", "fp32") and saved["cpu"]
    assert 0.25 < saved["classifier_test_accuracy"] <= 1  # 512 real images, 6 epochs: above 10%
    again = tmp_path / "again"
    generate.run(cfg(cond_dir, fmnist_shards, again, check=False))
    assert read_split(again / "train").fingerprint["content_hash"] == fp["content_hash"]


def test_stage_unconditional_pseudo_labels(uncond_dir, fmnist_shards, tmp_path):
    out = tmp_path / "syn"
    report = generate.run(cfg(uncond_dir, fmnist_shards, out, n=12, min_confidence=0.0, classifier_limit=128))
    data = read_split(out / "train")
    assert len(data.labels) == 12 and not report["conditional"] and "pseudo" in report["labels"]
    with pytest.raises(UserError, match="passed the reference classifier .pseudo-labels"):  # noise is never 99.99% anything
        generate.run(cfg(uncond_dir, fmnist_shards, tmp_path / "x", n=2, min_confidence=0.9999,
                         batch_size=2, classifier_limit=128))
    assert not (tmp_path / "x").exists()


class _Oracle(torch.nn.Module):
    """A stand-in reference classifier with known answers. It counts the candidates it has judged:
    candidate j (intended class (base + j) mod 10, as make_shard draws them) is predicted as its
    intended class when j is a multiple of 3, else as the next class; confidence 0.9 when the
    intended class is even, 0.4 when odd."""

    def __init__(self, base: int):
        super().__init__()
        self.base, self.seen = base, 0

    def forward(self, x):
        j = torch.arange(self.seen, self.seen + len(x))
        self.seen += len(x)
        intended = (self.base + j) % 10
        k = torch.where(j % 3 == 0, intended, (intended + 1) % 10)
        top = torch.where(intended % 2 == 0, torch.tensor(0.9), torch.tensor(0.4))
        p = torch.where(torch.nn.functional.one_hot(k, 10).bool(), top[:, None], ((1 - top) / 9)[:, None])
        return p.log()


def _expected(how: str, base: int, confidence: float, n: int) -> list[int]:
    quota, out = [n // 10] * 10, []
    for j in range(10 * n):
        intended = (base + j) % 10
        pred, conf = (intended if j % 3 == 0 else (intended + 1) % 10), (0.9 if intended % 2 == 0 else 0.4)
        if conf < confidence:
            continue
        if how == "relabel":
            out.append(pred)
        elif pred == intended and quota[intended]:
            quota[intended] -= 1
            out.append(intended)
    return out[:n]


@pytest.mark.parametrize("how", ["agree", "relabel"])
def test_filters_keep_what_the_reference_classifier_accepts(cond_dir, how):
    """agree: the candidates predicted as their intended class, up to each class's share of the shard
    (1 of 10 here: the kept set stays balanced); relabel: the confident candidates, labelled with the
    prediction (pseudo-labels). Every candidate is judged, so the agreement counts precede the filter."""
    from pipeline.generate.synthesis import MAX_TRIES, make_shard

    model = load_model(str(cond_dir))
    confidence = 0.3 if how == "agree" else 0.5
    c = GenerateConfig(model=str(cond_dir), n=10, sample_steps=2, batch_size=50, shard_size=10, bf16=False,
                       filter=how, min_confidence=confidence, seed=1)
    base = 1 * 10 * MAX_TRIES  # shard 1's candidate range
    steps = []
    images, labels, tried, raw = make_shard(model, c, 1, 10, _Oracle(base), "cpu", steps.append)
    assert labels.tolist() == _expected(how, base, confidence, 10) and len(images) == 10
    assert sum(steps) == 10 and min(steps) > 0  # the progress bar ends at the shard's count
    plain = []  # without a filter: one call per batch of the shard
    make_shard(model, replace(c, filter="none", batch_size=4), 0, 10, None, "cpu", plain.append)
    assert plain == [4, 4, 2]
    assert tried == 50 and raw[1].sum() == 50 and raw[0].sum() == 17  # candidates 0, 3, ..., 48 agree
    if how == "agree":
        assert np.bincount(labels, minlength=10).tolist() == [1] * 10


def test_quality_report_in_generate_json(cond_dir, fmnist_shards, tmp_path):
    """generate.json: the reference classifier (what it saw, its test accuracy), the generator's label
    agreement before any filter, the Frechet distance and precision/recall in the classifier's
    features, each beside its real-vs-real floor; the shards' fingerprint records the filter."""
    out = tmp_path / "syn"
    report = generate.run(cfg(cond_dir, fmnist_shards, out, n=40, shard_size=20, quality_n=30, classifier_limit=256))
    q = json.loads((out / "generate.json").read_text())["quality"]
    assert q == report["quality"] and q["n"] == 30 and "not Inception FID" in q["features"]
    assert q["frechet_distance"] > q["frechet_distance_real_vs_real"] >= 0  # an untrained UNet makes noise
    assert all(0 <= q[k] <= 1 for k in ("precision", "recall", "precision_real_vs_real", "recall_real_vs_real"))
    assert "never the test split" in report["classifier"] and "on 256 images" in report["classifier"]
    syn = read_split(out / "train").fingerprint["synthetic"]
    assert (syn["filter"], syn["candidates"], syn["kept_fraction"]) == ("none", 40, 1.0)
    # the reference classifier is saved beside the report; --reference reuses it (same judge, no training)
    again = generate.run(cfg(cond_dir, fmnist_shards, tmp_path / "again", n=40, shard_size=20, quality_n=30,
                             guidance=2.0, reference=str(out / "reference"), classifier_epochs=99))
    assert again["classifier"] == report["classifier"]
    assert again["classifier_test_accuracy"] == report["classifier_test_accuracy"]
    assert again["quality"]["frechet_distance_real_vs_real"] == q["frechet_distance_real_vs_real"]
    with pytest.raises(UserError, match="not a checkpoint folder"):
        generate.run(cfg(cond_dir, fmnist_shards, tmp_path / "x", reference=str(tmp_path)))


def test_refusals(cond_dir, uncond_dir, fmnist_shards, tmp_path, capsys):
    with pytest.raises(UserError, match="unconditional"):
        generate.run(cfg(uncond_dir, fmnist_shards, tmp_path / "o", guidance=2.0))
    for args in (["--n", "0"], ["--sampler", "euler"], ["--model", str(tmp_path / "missing")],
                 ["--sample-steps", "5000", "--no-check"]):
        with pytest.raises(SystemExit) as exc:
            main(["generate", "--model", str(cond_dir), "--real-train", str(fmnist_shards / "train"),
                  "--out", str(tmp_path / "o"), *args])
        assert exc.value.code == 2 and capsys.readouterr().err.startswith("error:"), args
    assert not (tmp_path / "o").exists()


def test_grid_rows_are_classes_and_empty_cells_are_blank_not_black():
    images = np.stack([np.full((4, 4, 3), 10 * k, np.uint8) for k in [0, 1, 2, 1]])
    grid = class_grid(images, np.array([0, 1, 2, 1]), 4, per_class=2)
    assert grid.shape == (16, 8, 3)
    assert (grid[:4, :4] == 0).all() and (grid[4:8] == 10).all() and (grid[8:12, :4] == 20).all()  # samples kept
    for empty in (grid[:4, 4:], grid[8:12, 4:], grid[12:16, :4], grid[12:16, 4:]):  # class 0 has 1, class 3 none
        assert (empty[1:-1, 1:-1] == 255).all()  # white inside: not a black "generated" image
        edge = np.concatenate([empty[0], empty[-1], empty[:, 0], empty[:, -1]])
        assert (edge == 128).all()  # a thin mid-grey outline


def test_two_processes_equal_one(cond_dir, fmnist_shards, tmp_path):
    """accelerate launch, 2 CPU processes at 1 torch thread each; each writes whole shards.

    Depends on: the processor and the threads per process. Against one process at the same 1 thread
    the split is byte-equal (any x86-64 CPU: same kernels, same reductions). Against one process at
    the suite's threads it is equal within float rounding: the UNet's fp32 reductions are split
    across threads, which moved pixels by one grey level on an Intel AVX-512 machine (repro.py).
    """
    from launch import accelerate_launch

    args = ["generate", "--model", cond_dir, "--real-train", fmnist_shards / "train", "--real-test",
            fmnist_shards / "test", "--n", 30, "--shard-size", 8, "--batch-size", 4, "--sample-steps", 3,
            "--no-bf16", "--classifier-arch", "cnn", "--classifier-epochs", 1, "--classifier-limit", 128, "--seed", 3]
    with torch_threads(1):
        main([*map(str, args), "--out", str(tmp_path / "one")])
    main([*map(str, args), "--out", str(tmp_path / "suite-threads")])
    proc = accelerate_launch([*args, "--out", tmp_path / "two"])
    assert proc.returncode == 0, proc.stderr[-3000:]
    one, two = tree_bytes(tmp_path / "one" / "train"), tree_bytes(tmp_path / "two" / "train")
    assert len(one) == 5 and one == two  # 4 shards (8+8+8+6) and the fingerprint, byte for byte
    reports = [json.loads((tmp_path / d / "generate.json").read_text()) for d in ("one", "two")]
    assert reports[1]["processes"] == 2 and reports[0]["processes"] == 1
    for key in ("agreement", "agreement_per_class", "classifier_test_accuracy", "candidates"):
        assert reports[0][key] == reports[1][key], key
    assert not (tmp_path / "two.tmp").exists()
    a, b = read_split(tmp_path / "one" / "train"), read_split(tmp_path / "suite-threads" / "train")
    assert a.keys == b.keys and np.array_equal(a.labels, b.labels)
    assert_images_close(a.images, b.images, grey_levels=1)


def test_unconditional_shard_depends_only_on_its_index(uncond_dir, fmnist_shards, tmp_path):
    """Pseudo-labelled shards draw candidates from their own index range: a longer run shares its
    first shards with a shorter one, which is what lets processes split the shards."""
    short = generate.run(cfg(uncond_dir, fmnist_shards, tmp_path / "a", n=6, shard_size=3, batch_size=3,
                             min_confidence=0.0, classifier_limit=128, check=False))
    generate.run(cfg(uncond_dir, fmnist_shards, tmp_path / "b", n=9, shard_size=3, batch_size=3,
                     min_confidence=0.0, classifier_limit=128, check=False))
    a, b = read_split(tmp_path / "a" / "train"), read_split(tmp_path / "b" / "train")
    assert np.array_equal(a.images, b.images[:6]) and np.array_equal(a.labels, b.labels[:6])
    assert short["candidates"] >= 6

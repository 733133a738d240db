"""Stage `train` on a real cache (tiny UNet, real Fashion-MNIST): pairing, online = cached,
refusals before training, resume equality, CLI end to end."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pipeline.cache.config import ExtractConfig
from pipeline.classifiers.zoo import load_classifier
from pipeline.cli import main
from pipeline.core.errors import UserError
from pipeline.core.shards import Split, read_split, write_split
from pipeline.core.views import ViewRequest, apply_view_reference
from pipeline.report.results import read_log
from pipeline.train import trainer
from pipeline.train.config import TargetNorm, TrainConfig
from pipeline.train.data import assemble
from pipeline.train.runtime import Runtime
from pipeline.train.state import STATE_FILE
from stages import extract, train

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory, fmnist_shards) -> Path:
    """Stand-in synthetic shards: 128 real test images under other keys."""
    out = tmp_path_factory.mktemp("syn")
    test = read_split(fmnist_shards / "test")
    write_split(out / "train", Split(test.images[:128], test.labels[:128], test.fingerprint["classes"]),
                [f"syn-train-{i:07d}" for i in range(128)], shard_size=64, progress=False)
    return out


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir, fmnist_shards, synthetic_dir) -> Path:
    out = tmp_path_factory.mktemp("cache") / "feats.zarr"
    extract.run(ExtractConfig(model=str(model_dir), real_splits=str(fmnist_shards), synthetic=str(synthetic_dir),
                              out=str(out), views=3, views_synthetic=2, batch_size=128, rows_per_chunk=32,
                              chunks_per_shard=4, limit=256, t="100,40", layer="mid_block,up_blocks.0"))
    return out


def cfg(store, out, **kw) -> TrainConfig:
    base = TrainConfig(cache=str(store), out=str(out), real_limit=0, epochs=1, batch_size=64, attack_steps=2,
                       head_hidden=32, ema_decay=0.9)
    return replace(base, **kw)


def test_on_a_gpu_the_run_records_the_accelerators_bf16(monkeypatch):
    """The CUDA branch, forced on any machine: the Accelerator is asked for bf16 mixed precision and
    the run records bf16 (metrics.json's ``precision``), the same decision in one place."""
    import accelerate

    from pipeline.train import runtime

    assert Runtime("cpu").precision == "fp32"
    asked = {}

    class FakeAccelerator:
        def __init__(self, **kw):
            asked.update(kw)
            self.state, self.process_index, self.num_processes, self.device = None, 0, 1, torch.device("cuda")

    monkeypatch.setattr(runtime, "choose_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(accelerate, "Accelerator", FakeAccelerator)
    rt = Runtime("auto")
    assert asked == {"cpu": False, "mixed_precision": "bf16"} and rt.precision == "bf16" and rt.device.type == "cuda"


def _data(c: TrainConfig):
    rt = Runtime("cpu")
    data = trainer.open_data(c, rt)
    return rt, data, trainer.make_sampler(c, data, rt)


@pytest.mark.parametrize("budget", [2048, 0])
def test_each_image_is_paired_with_its_own_views_target(store, fmnist_shards, synthetic_dir, budget):
    rt, data, sampler = _data(cfg(store, "unused", synthetic_fraction=0.25, memory_budget_mb=budget))
    assert data.mode == data.images == ("stream" if budget == 0 else "ram")  # images stream with the targets
    real, syn = read_split(fmnist_shards / "train", limit=256), read_split(synthetic_dir / "train")
    cache = data.cache
    for batch in [sampler.batch(0, 0), sampler.batch(0, 3)]:
        inputs = assemble(batch, data.real, data.synthetic, data.pad)
        assert len(inputs["x"]) == 64
        pairs = [("train", real, n, k) for n, k in zip(batch.real_rows, batch.real_views)]
        pairs += [("synthetic", syn, n, k) for n, k in zip(batch.syn_rows, batch.syn_views)]
        assert len(pairs) == 64 and sum(p[0] == "synthetic" for p in pairs) == 16
        for i, (name, ss, n, k) in enumerate(pairs):
            part = cache.part(name)
            img = ss.images[ss.keys.index(part.keys[n])]
            v = {key: int(part.views[key][n, k]) for key in ("dx", "dy", "flip")}
            ref = apply_view_reference(img, v["dx"], v["dy"], v["flip"], 2).astype(np.float32) / 255
            assert np.array_equal(inputs["x"][i].permute(1, 2, 0).numpy(), ref), (name, n, k)
            row = part.read(np.array([n]), np.array([k]))[0]
            assert np.array_equal(inputs["target"][i].numpy(), row)
            assert inputs["seed"][i] == part.noise_seed[n, k] and inputs["y"][i] == part.labels[n]
            others = [o for o in range(part.k) if o != k]  # the test can fail: views differ
            assert all(not np.array_equal(row, part.read(np.array([n]), np.array([o]))[0]) for o in others)


def test_train_reads_the_target_set_it_asks_for_and_refuses_absent_ones(store, tmp_path, capsys):
    """--t / --layer pick one of the cache's sets (the default: the cache's default set): the batch's
    targets, the cache statistics and the head's width are that set's, and the run records it."""
    _, data, sampler = _data(cfg(store, "unused", t=40, layer="up_blocks.0", synthetic_fraction=0.25))
    assert data.target.name == "t40-up_blocks.0"
    batch = sampler.batch(0, 2)
    inputs = assemble(batch, data.real, data.synthetic, data.pad)
    part = data.cache.part("train", data.target)
    n_real = len(batch.real_rows)
    np.testing.assert_array_equal(inputs["target"][:n_real].numpy(), part.read(batch.real_rows, batch.real_views))
    assert not np.array_equal(part.read(batch.real_rows, batch.real_views),
                              data.cache.part("train").read(batch.real_rows, batch.real_views))
    np.testing.assert_array_equal(data.mean.numpy(), part.mean)
    assert _data(cfg(store, "unused"))[1].target.name == "t100-mid_block"  # the cache's default
    assert _data(cfg(store, "unused", t=40))[1].target.name == "t40-mid_block"  # the default layer at t=40
    m = train.run(cfg(store, tmp_path / "run", t=40, layer="up_blocks.0", max_steps=1))
    _, meta = load_classifier(tmp_path / "run")
    assert meta["cache"]["target_set"] == "t40-up_blocks.0" and (meta["cache"]["t"], meta["cache"]["layer"]) == (40, "up_blocks.0")
    assert m["budget"]["steps"] == 1
    with pytest.raises(UserError, match=r"no target set t=50 layer=mid_block; it holds: t=100 layer=mid_block, "
                                        r"t=100 layer=up_blocks.0, t=40 layer=mid_block, t=40 layer=up_blocks.0"):
        train.run(cfg(store, tmp_path / "absent", t=50))
    assert not (tmp_path / "absent").exists()
    with pytest.raises(SystemExit):
        main(["train", "--cache", str(store), "--out", str(tmp_path / "cli"), "--layer", "down_blocks.0"])
    assert capsys.readouterr().err.strip().splitlines()[-1].startswith("error: the cache holds no target set t=100 "
                                                                        "layer=down_blocks.0")


def test_online_targets_equal_cached(store):
    c = cfg(store, "unused", synthetic_fraction=0.25)
    rt, data, sampler = _data(c)
    from pipeline.cache.extractor import FeatureExtractor

    ext = FeatureExtractor.from_cache(data.cache, data.target)
    inputs = assemble(sampler.batch(0, 1), data.real, data.synthetic, data.pad)
    cached = trainer.targets_for(inputs, data, None, TargetNorm.none, rt.device)
    data.mode = "online"
    online = trainer.targets_for(inputs, data, ext, TargetNorm.none, rt.device)
    assert F.cosine_similarity(cached, online, dim=1).min() >= 0.999
    for norm in (TargetNorm.center, TargetNorm.whiten):
        data.mode = "ram"
        a = trainer.targets_for(inputs, data, None, norm, rt.device)
        data.mode = "online"
        b = trainer.targets_for(inputs, data, ext, norm, rt.device)
        assert F.cosine_similarity(a, b, dim=1).min() >= 0.99


def test_cli_end_to_end(store, tmp_path, capsys):
    out = tmp_path / "run"
    main(["train", "--cache", str(store), "--out", str(out), "--epochs", "2", "--batch-size", "64",
          "--attack-steps", "2", "--head-hidden", "32", "--synthetic-fraction", "0.25", "--real-limit", "0"])
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["epochs"] == 2 and metrics["steps_per_epoch"] == 4 and metrics["target_mode"] == "ram"
    assert metrics["device"] == "cpu" and metrics["precision"] == "fp32"  # what ran: no GPU in this test
    # ceil(N_real / batch) steps per epoch whatever the mix, full batches of 48 real + 16 synthetic
    assert metrics["budget"] == {"steps": 8, "batch_size": 64, "samples": 512, "real_samples": 384,
                                 "synthetic_samples": 128, "steps_per_epoch": 4}
    log = (out / "log.tsv").read_text().splitlines()
    header = log[0].split("\t")
    assert len(log) == 3 and {"ce", "dra", "loss", "adv_acc", "clean_acc", "lr", "step_time_s"} <= set(header)
    model, mcfg = load_classifier(out)
    assert mcfg["finished"] and mcfg["arch"] == "cnn" and mcfg["train"]["synthetic_fraction"] == 0.25
    assert model(torch.rand(2, 1, 28, 28)).shape == (2, 10)


def test_plain_at_and_trades(store, tmp_path):
    m = train.run(cfg(store, tmp_path / "at", dra_weight=0.0, batch_size=128))
    assert m["target_mode"] == "none" and "dra" not in m and m["steps_per_epoch"] == 2
    m = train.run(cfg(store, tmp_path / "trades", method="trades", lr_schedule="onecycle", dra_schedule="cosine-decay",
                      epochs=2, max_steps=3))
    assert {"ce", "kl", "dra"} <= set(m) and m["step"] == 3  # --max-steps: an equal budget across variants


def _incomplete(store: Path, tmp: Path) -> Path:
    copy = tmp / "incomplete.zarr"
    shutil.copytree(store, copy)
    meta = json.loads((copy / "zarr.json").read_text())
    del meta["attributes"]["complete"]
    (copy / "zarr.json").write_text(json.dumps(meta))
    return copy


@pytest.mark.parametrize("case", ["other-data", "image-size", "view-spec", "missing-shards", "incomplete",
                                  "no-synthetic-part", "bad-flag"])
def test_refusals_before_training(store, fmnist_shards, tmp_path, case):
    out = tmp_path / "out"
    c = cfg(store, out)
    make = {"other-data": lambda: replace(c, real_shards=str(fmnist_shards / "test")),
         "image-size": lambda: replace(c, image_size=32),
         "view-spec": lambda: replace(c, view=ViewRequest(pad=4)),
         "missing-shards": lambda: replace(c, real_shards=str(tmp_path / "nowhere")),
         "incomplete": lambda: replace(c, cache=str(_incomplete(store, tmp_path))),
         "no-synthetic-part": lambda: replace(c, cache=str(store), synthetic_fraction=0.5,
                                              synthetic_shards=str(tmp_path / "nowhere")),
         "bad-flag": lambda: replace(c, method="fgsm")}[case]
    with pytest.raises(UserError) as err:  # an unknown enum value is refused when the config is built
        train.run(make())
    assert "\n" not in str(err.value)
    assert not out.exists()  # refused before anything was written


def test_cli_refusal_is_one_line(store, fmnist_shards, tmp_path, capsys):
    with pytest.raises(SystemExit) as ex:
        main(["train", "--cache", str(store), "--out", str(tmp_path / "o"), "--real-shards", str(fmnist_shards / "test")])
    assert ex.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and "other data" in err


def _state(out: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(out / STATE_FILE))


def test_resume_mid_epoch_equals_uninterrupted(store, tmp_path):
    c = cfg(store, tmp_path / "full", epochs=2, synthetic_fraction=0.25, seed=3, log_every=3)
    full = train.run(c)
    part = replace(c, out=str(tmp_path / "part"))
    assert train.run(part, stop_after_steps=7) == {"stopped_at": 7}  # killed in epoch 2 (4 steps each)
    resumed = train.run(replace(part, resume=True))
    a, b = _state(tmp_path / "full"), _state(tmp_path / "part")
    assert set(a) == set(b)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    logs = [read_log(tmp_path / d / "log.tsv") for d in ("full", "part")]
    for key in logs[0]:
        if key != "step_time_s":
            assert logs[0][key] == logs[1][key], key
    assert full["loss"] == resumed["loss"]
    assert _dvclive(tmp_path / "full") == _dvclive(tmp_path / "part")
    with pytest.raises(UserError, match="other settings"):
        train.run(replace(part, resume=True, lr=0.1))


def _dvclive(out: Path) -> dict[str, list[str]]:
    """The run's DVCLive metric files (rows), wall-clock ones left out."""
    root = out / "dvclive" / "plots" / "metrics"
    return {str(p.relative_to(root)): p.read_text().splitlines() for p in sorted(root.rglob("*.tsv"))
            if p.stem != "step_time_s"}


def test_per_step_metrics_go_through_dvclive(store, tmp_path):
    """Every --log-every steps and at each epoch's last step a train/ row (so a run shorter than
    --log-every still has its curve), at each epoch's end an epoch/ row (log.tsv's), in DVCLive's
    layout (one TSV per metric with its step, metrics.json with the latest values)."""
    out = tmp_path / "run"
    train.run(cfg(store, out, epochs=2, log_every=2))
    logs = _dvclive(out)
    steps = [int(r.split("\t")[0]) for r in logs["train/loss.tsv"][1:]]
    per_epoch = read_log(out / "log.tsv")
    total = int(per_epoch["step"][-1])
    ends = [int(s) for s in per_epoch["step"]]
    assert logs["train/loss.tsv"][0] == "step\tloss" and steps == sorted(set(range(2, total + 1, 2)) | set(ends))
    short = tmp_path / "short"  # fewer steps than --log-every: one row per epoch all the same
    train.run(cfg(store, short, epochs=1, log_every=1000))
    assert [int(r.split("\t")[0]) for r in _dvclive(short)["train/loss.tsv"][1:]] == read_log(short / "log.tsv")["step"]
    assert {"train/adv_acc.tsv", "train/lr.tsv", "train/dra_weight.tsv", "epoch/loss.tsv"} <= set(logs)
    epoch_rows = [r.split("\t") for r in logs["epoch/adv_acc.tsv"][1:]]
    assert [int(s) for s, _ in epoch_rows] == [int(s) for s in per_epoch["step"]]
    assert [float(v) for _, v in epoch_rows] == [float(v) for v in per_epoch["adv_acc"]]
    summary = json.loads((out / "dvclive" / "metrics.json").read_text())
    assert summary["step"] == total and summary["epoch"]["epoch"] == 2


def test_a_run_inside_someone_elses_git_project_leaves_it_as_it_was(store, tmp_path, monkeypatch):
    """DVCLive would `dvc init` the Git repository around a run that is not in a DVC repository and
    stage the new files; a run there writes its own folder and nothing else."""
    project = tmp_path / "project"
    project.mkdir()
    git = ["git", "-C", str(project), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "start"], check=True)
    monkeypatch.chdir(project)
    train.run(cfg(store, project / "run", epochs=1))
    assert sorted(p.name for p in project.iterdir()) == [".git", "run"]
    status = subprocess.run([*git, "status", "--porcelain"], check=True, capture_output=True, text=True).stdout
    assert status.splitlines() == ["?? run/"]
    assert (project / "run" / "dvclive" / "plots" / "metrics" / "train" / "loss.tsv").is_file()


def test_resume_refuses_another_cache_at_the_same_path(store, tmp_path):
    """--resume compares the cache's digest, not its path: a store replaced in place is another cache."""
    from pipeline.cache.store import attrs_digest

    other = tmp_path / "feats.zarr"
    shutil.copytree(store, other)
    c = cfg(other, tmp_path / "run", epochs=2, seed=3)
    assert train.run(c, stop_after_steps=2) == {"stopped_at": 2}
    doc = json.loads((other / "zarr.json").read_text())
    doc["attributes"]["probe"] = {"probe_accuracy": 0.99}  # another, self-consistent cache
    doc["attributes"]["digest"] = attrs_digest(doc["attributes"])
    (other / "zarr.json").write_text(json.dumps(doc))
    with pytest.raises(UserError, match="trained on another cache"):
        train.run(replace(c, resume=True))


def test_two_processes_stay_synchronised(store, tmp_path):
    """Data-parallel under accelerate on CPU: 2 processes, each its half of every batch."""
    from launch import accelerate_launch

    out = tmp_path / "ddp"
    proc = accelerate_launch(["train", "--cache", store, "--out", out, "--epochs", "1", "--batch-size", "64",
                              "--attack-steps", "2", "--head-hidden", "32", "--synthetic-fraction", "0.25",
                              "--real-limit", "0"])
    assert proc.returncode == 0, proc.stderr[-2000:]
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["processes"] == 2 and metrics["synchronised"] is True and metrics["steps_per_epoch"] == 4
    assert load_classifier(out)[1]["finished"]


def _progress(out: Path) -> int:
    from safetensors import safe_open

    try:
        with safe_open(str(out / STATE_FILE), framework="pt") as fh:
            return json.loads(fh.metadata()["progress"])["global_step"]
    except Exception:  # not written yet
        return -1


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(store, tmp_path):
    """A real kill: the process dies mid-epoch after a mid-epoch checkpoint; --resume finishes the run."""
    import signal
    import time

    args = ["--cache", str(store), "--epochs", "2", "--batch-size", "64", "--attack-steps", "2", "--head-hidden",
            "32", "--real-limit", "0", "--checkpoint-every", "2", "--seed", "5"]
    full = tmp_path / "full"
    main(["train", "--out", str(full), *args])
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "pipeline", "train", "--out", str(out), *args], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while _progress(out) < 6 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert 6 <= _progress(out) < 8 and not (out / "metrics.json").exists()  # killed in epoch 2 of 4+4 steps
    main(["train", "--out", str(out), *args, "--resume"])
    a, b = _state(full), _state(out)
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_one_sample_order_whatever_the_memory_mode(store, tmp_path):
    """Plain AT (reads no targets, images in RAM) and AT+DRA streamed past a 0 MiB budget draw the
    same (row, view) batches: the order is chunk-aware by the cache's chunking in every mode, and
    recorded in the run's config for the report's pairing check."""
    from reliability_helpers import train_cfg

    runs = {"at_ram": train_cfg(store, tmp_path / "a", dra_weight=0.0),
            "dra_stream": train_cfg(store, tmp_path / "b", memory_budget_mb=0),
            "dra_ram": train_cfg(store, tmp_path / "c", memory_budget_mb=1 << 20)}
    made = {name: trainer.Trainer.create(cfg) for name, cfg in runs.items()}
    assert made["dra_stream"].data.mode == "stream" and made["dra_ram"].data.mode == "ram"
    assert made["at_ram"].data.images == "ram"
    orders = {name: [(b.real_rows.tolist(), b.real_views.tolist()) for e in range(2) for b in tr.sampler.batches(e)]
              for name, tr in made.items()}
    assert orders["at_ram"] == orders["dra_stream"] == orders["dra_ram"]
    assert len({tr.meta["order"]["rows_per_chunk"]["train"] for tr in made.values()}) == 1
    assert all(tr.meta["order"]["mode"] == "chunk-aware" for tr in made.values())


def test_per_epoch_validation_logs_the_curve_and_keeps_the_best_epoch(store, fmnist_shards, tmp_path, capsys):
    """--val-n: after every epoch the EMA model's clean and PGD accuracy on train rows it never
    trains on go into log.tsv; OUT/best holds the best epoch's EMA model (re-measured, it gives the
    logged figure exactly) and metrics.json names the epoch; too few held-out rows is one error line."""
    from reliability_helpers import assert_one_error_line, run_cli, train_cfg

    from pipeline.cache.store import open_cache
    from pipeline.train.validation import measure, validation_set

    out = tmp_path / "val"
    cfg = train_cfg(store, out, real_limit=32, val_n=24, val_pgd_steps=2, epochs=3)
    metrics = train.run(cfg)
    log = read_log(out / "log.tsv")
    assert len(log["val_pgd"]) == 3 and all(0 <= p <= c <= 1 for p, c in zip(log["val_pgd"], log["val_clean"]))
    best = metrics["best"]
    assert best["val_pgd"] == max(log["val_pgd"]) and best["epoch"] == 1 + log["val_pgd"].index(max(log["val_pgd"]))
    model, config = load_classifier(out / "best")
    assert config["best"]["epoch"] == best["epoch"]
    part = open_cache(str(store)).part("train")
    val = validation_set(part, 32, 24)
    assert val.rows == (32, 56)  # after the 32 rows trained on
    again = measure(model, val, eps=cfg.eps, steps=2, seed=cfg.seed, device=torch.device("cpu"))
    assert again == {"val_clean": best["val_clean"], "val_pgd": best["val_pgd"]}
    code, _, err = run_cli(capsys, ["train", "--cache", store, "--out", tmp_path / "bad", "--real-limit", "32",
                                    "--val-n", str(part.n), "--epochs", "1", "--batch-size", "32"])
    assert "validation needs rows it never trains on" in assert_one_error_line(code, err)
    assert not (tmp_path / "bad").exists()
    # --val-every 2 of 3 epochs: epochs 2 and 3 (the last) are measured, epoch 1 is not, and the same
    # run's validation rows give the same figures as every-epoch validation at those epochs
    sparse = train.run(train_cfg(store, tmp_path / "every2", real_limit=32, val_n=24, val_pgd_steps=2, epochs=3,
                                 val_every=2))
    rows = (tmp_path / "every2" / "log.tsv").read_text().splitlines()
    col = rows[0].split("\t").index("val_pgd")
    assert [r.split("\t")[col] for r in rows[1:]] == ["", *map(str, log["val_pgd"][1:])]
    assert sparse["best"]["epoch"] in (2, 3)
    # evaluating OUT/best reports the run's budget and time (the run trained it), and the epoch chosen
    from pipeline.evaluate.config import AutoAttackVersion, EvaluateConfig
    from stages import evaluate

    res = evaluate.run(EvaluateConfig(checkpoint=str(out / "best"), shards=str(fmnist_shards / "test"), n=32,
                                      pgd_steps=1, pgd_restarts=1, autoattack=AutoAttackVersion.none, check_n=16,
                                      out=str(tmp_path / "best.json")))
    assert res["train_metrics"]["budget"] == metrics["budget"] and res["train_metrics"]["epochs"] == 3
    assert res["train_metrics"]["checkpoint"] == {"best_epoch": best["epoch"], "of": 3}
    assert res["checks"]["training_finished"] is True
    # a best/ folder under another run (whose metrics name another best epoch) claims no budget and
    # fails the finished check
    import shutil

    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "metrics.json").write_text(json.dumps({**metrics, "best": {"epoch": 99, "val_pgd": 0.0}}))
    shutil.copytree(out / "best", tmp_path / "other" / "best")
    other = evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "other" / "best"), shards=str(fmnist_shards / "test"),
                                        n=32, pgd_steps=1, pgd_restarts=1, autoattack=AutoAttackVersion.none,
                                        check_n=16, out=str(tmp_path / "other.json")))
    assert other["train_metrics"] == {} and other["checks"]["training_finished"] is False

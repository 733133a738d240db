"""The command line behaves like a well-made tool: an interrupt is one line and a distinct exit
status (never 0, nothing left looking finished)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.cli import STAGES, main

ROOT = Path(__file__).resolve().parents[1]


def _lines(err: str) -> list[str]:
    return [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]


def _one_interrupt_line(err: str) -> str:
    """No traceback, exactly one ``error:`` line, the last one, and it says ``interrupted``."""
    lines = _lines(err)
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert "Traceback" not in err and len(errors) == 1 and lines[-1] == errors[0], err
    assert errors[0].startswith("error: interrupted"), err
    return errors[0]


def _signal_when(proc: subprocess.Popen, ready, sig: int, timeout: float = 300) -> tuple[int, str]:
    """Send ``sig`` once ``ready()`` holds (the stage has started working); (exit status, stderr)."""
    deadline = time.time() + timeout
    while not ready() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, "the stage ended before it could be interrupted"
    assert ready(), "the stage did not start in time"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def _popen(*args) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *map(str, args)], cwd=ROOT, text=True,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def test_sigint_stops_train_with_130_a_resume_hint_and_no_finished_marker(store, tmp_path):
    out = tmp_path / "run"
    proc = _popen("train", "--cache", store, "--out", out, "--epochs", "1000", "--batch-size", "32",
                  "--attack-steps", "1", "--head-hidden", "16", "--real-limit", "0", "--checkpoint-every", "1")
    code, err = _signal_when(proc, lambda: (out / "state.safetensors").exists(), signal.SIGINT)
    assert code == 130, err
    line = _one_interrupt_line(err)
    assert line.startswith("error: interrupted (SIGINT): checkpoint at step ") and line.endswith(
        f"kept in {out}; rerun with --resume"), line
    assert not (out / "metrics.json").exists()
    assert json.loads((out / "config.json").read_text())["finished"] is False


def test_sigterm_stops_diffusion_with_143_keeping_its_checkpoint(fmnist_shards, tmp_path):
    out = tmp_path / "diffusion"
    ckpt = tmp_path / "diffusion.ckpt"
    proc = _popen("diffusion", "--shards", fmnist_shards / "train", "--out", out, "--steps", "100000",
                  "--batch-size", "16", "--block-channels", "8,16", "--warmup-steps", "0", "--limit", "64",
                  "--checkpoint-every", "2", "--no-bf16")
    code, err = _signal_when(proc, lambda: any(ckpt.glob("step-*/state.json")), signal.SIGTERM)
    assert code == 143, err
    line = _one_interrupt_line(err)
    assert line.startswith("error: interrupted (SIGTERM): checkpoint step-") and f"kept in {ckpt}; rerun the same " \
        "command to resume" in line, line
    assert not out.exists() and not Path(f"{out}.tmp").exists()  # nothing looks like a trained model


@pytest.mark.parametrize("stage", list(STAGES))
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_every_stage_turns_a_signal_into_one_line_and_its_exit_status(stage, sig, tmp_path, monkeypatch, capsys):
    """In process: the stage's work is replaced by a wait that the signal interrupts."""
    import importlib

    def work(cfg):
        os.kill(os.getpid(), sig)
        time.sleep(30)  # the handler raises here
        raise AssertionError("the signal did not interrupt the stage")

    before = [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)]
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(importlib.import_module(STAGES[stage][1]), "run", work)
    with pytest.raises(SystemExit) as exc:
        main([stage, "--out", str(tmp_path / "out")])
    assert exc.value.code == {signal.SIGINT: 130, signal.SIGTERM: 143}[sig]
    line = _one_interrupt_line(capsys.readouterr().err)
    assert line.startswith(f"error: interrupted ({sig.name}): ") and "rerun" in line, line
    assert [signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)] == before  # main put them back


# fields whose config.py (pipeline/cache, pipeline/report) still lacks their `# comment`


def _help_records(stage: str) -> dict[str, tuple[str, str]]:
    """option name -> (flags + metavar, help text) as `STAGE --help` prints them."""
    import click

    from pipeline.cli import stage_command

    cmd = stage_command(stage)
    ctx = click.Context(cmd)
    return {p.name: p.get_help_record(ctx) for p in cmd.get_params(ctx) if p.name != "help"}


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_flag_has_a_help_line_from_its_config_comment(stage, capsys):
    import re

    from pipeline.cli import config_class
    from pipeline.core.config import field_help

    records = _help_records(stage)
    missing = sorted(name for name, (_, text) in records.items()
                     if not re.sub(r"\[default: [^\]]*\]", "", text).strip())
    assert not missing, f"{stage}: flags without a `# comment` in their config.py: {missing}"
    # the help is the comment, read from the source (one place): a field's trailing comment is in it
    cls = config_class(stage)
    for name, note in field_help(cls).items():
        if note and name in records:
            assert note.split(";")[0].split()[0] in records[name][1], (stage, name)
    main([stage, "--help"])  # returns: exit 0
    assert "--out" in capsys.readouterr().out


def test_closed_sets_that_are_strings_list_their_choices():
    from pipeline.cache.store import COMPRESSORS

    for stage in ("train", "evaluate", "bench"):
        assert all(c in _help_records(stage)["device"][1] for c in ("auto", "cpu", "cuda")), stage
    extract = _help_records("extract")
    assert all(name in extract["compressor"][1] for name in COMPRESSORS), extract["compressor"]
    assert extract["views"][0].endswith("N|all") and extract["views_synthetic"][0].endswith("N|all")
    assert "N|all" not in _help_records("bench")["views"][0]  # bench's --views is a count only


def test_version_prints_the_package_version_and_exits_0(monkeypatch, capsys):
    import re
    import tomllib
    from importlib import metadata

    from pipeline.cli import version

    want = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    proc = subprocess.run([sys.executable, "-m", "pipeline", "--version"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stdout == f"dra-feature-cache {want}\n" and not proc.stderr, proc
    assert re.fullmatch(r"\d+\.\d+\.\d+", want)

    def not_installed(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(metadata, "version", not_installed)  # a source tree that is not installed
    assert version() == want
    main(["--version"])  # returns: the CLI's exit 0
    assert capsys.readouterr().out == f"dra-feature-cache {want}\n"


def test_defaults_are_the_recommended_settings_and_the_profiles_pass_theirs():
    import yaml

    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.train.config import TrainConfig

    train, evaluate = TrainConfig(), EvaluateConfig()
    assert (train.dra_weight, train.real_limit, evaluate.fast_iters) == (0.1, 0, 50)
    assert "[default: 0.1]" in _help_records("train")["dra_weight"][1]
    assert "[default: 50]" in _help_records("evaluate")["fast_iters"][1]
    # every DVC profile sets these itself: a changed default never changes what `dvc repro` runs
    dvc = (ROOT / "dvc.yaml").read_text()
    for flag in ("--dra-weight ${item.dra_weight}", "--dra-weight ${sweep.dra_weight}", "--real-limit ${train.real_limit}",
                 "--fast-iters ${evaluate.fast_iters}"):
        assert flag in dvc, flag
    for path in ("params.yaml", "tests/quick_params.yaml", *(f"pipeline/params/{p.name}" for p in (ROOT / "pipeline" / "params").glob("*.yaml"))):
        p = yaml.safe_load((ROOT / path).read_text())
        if "driver" in p:  # a study run by its own driver: test_driver_profiles_pass_only_valid_settings
            continue
        assert "real_limit" in p["train"] and "fast_iters" in p["evaluate"] and "dra_weight" in p["sweep"], path
        assert all("dra_weight" in run for run in p["runs"].values()), path


def test_driver_profiles_pass_only_valid_settings():
    """A study profile that its driver turns into flags (pipeline/params/scarce.yaml): every run's
    settings, every sweep cell's and the evaluation's are fields of the stage's config and pass its
    checks, so a typo fails here, not hours into a study; every run sets lambda and the synthetic share
    itself, and the sweep never uses a study seed."""
    import dataclasses
    import importlib.util

    import yaml

    import pipeline.cli as cli
    from pipeline.cache.config import ExtractConfig
    from pipeline.evaluate.config import EvaluateConfig
    from pipeline.generate.config import GenerateConfig
    from pipeline.train.config import TrainConfig

    def parsed(stage: str, argv: list[str]):  # noqa: ANN202 - the config the CLI builds, not run
        got = []
        monkey = cli.run_stage
        cli.run_stage = lambda _module, cfg: got.append(cfg)
        try:
            cli.stage_command(stage).main(args=argv, standalone_mode=False)
        finally:
            cli.run_stage = monkey
        return got[0]

    profiles = [p for p in (ROOT / "pipeline" / "params").glob("*.yaml") if "driver" in yaml.safe_load(p.read_text())]
    assert profiles
    for path in profiles:
        p = yaml.safe_load(path.read_text())
        assert (ROOT / p["driver"]).exists() and (ROOT / p["model"] / "model_info.json").exists(), path
        spec = importlib.util.spec_from_file_location("driver", ROOT / p["driver"])
        driver = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(driver)
        flags = driver.flags
        fields = lambda cls: {f.name for f in dataclasses.fields(cls)}  # noqa: E731
        for section, cls in (("generate", GenerateConfig), ("extract", ExtractConfig), ("evaluate", EvaluateConfig)):
            assert set(p[section]) <= fields(cls), (path, section, set(p[section]) - fields(cls))
        EvaluateConfig(**p["evaluate"]).validate()
        s = p["sweep"]
        cells = [dict(t=t, layer=layer, align_layer=a, dra_weight=w) for t, layer in s["target_sets"]
                 for a in s["align_layers"] for w in s["dra_weights"]]
        assert s["seed"] not in p["seeds"], path
        for name, run in [*p["runs"].items(), *((f"sweep {c}", {**s["train"], **c}) for c in cells)]:
            run = {k: v for k, v in run.items() if k not in ("variant", "dra")}
            if p["runs"].get(name, {}).get("dra") == "sweep":
                run |= cells[0]
            assert "dra_weight" in run and "synthetic_fraction" in run, (path, name)
            assert set(run) | set(p["train"]) <= fields(TrainConfig), (path, name)
            TrainConfig(**(p["train"] | run)).validate()
            # and through the driver's flags and the CLI's parser: every value arrives as given
            cfg = parsed("train", flags(p["train"] | run | {"seed": 3}))
            assert all(getattr(cfg, k) == (tuple(v) if isinstance(v, list) else v) or str(getattr(cfg, k).value) == str(v)
                       for k, v in (p["train"] | run).items() if not isinstance(getattr(cfg, k), dict)), name
        for over in ({}, {"autoattack": "none"}, {"n": 500, "autoattack": "standard", "autoattack_n": 0}):
            cfg = parsed("evaluate", flags(p["evaluate"] | over))
            assert all(str(getattr(cfg, k).value if hasattr(getattr(cfg, k), "value") else getattr(cfg, k)) == str(v)
                       for k, v in (p["evaluate"] | over).items()), over


def _files(folder: Path) -> dict[str, tuple[bytes, int]]:
    """Every file under ``folder`` (dvclive/ included) by relative path: its bytes and mtime."""
    return {str(p.relative_to(folder)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_run_in_out_is_replaced_only_with_overwrite_and_continued_only_with_resume(store, checkpoint, tmp_path,
                                                                                      capsys):
    import shutil

    from reliability_helpers import TRAIN_ARGS, assert_one_error_line, run_cli, train_cfg

    from stages import train

    finished = tmp_path / "finished"
    shutil.copytree(checkpoint, finished)
    before = _files(finished)
    argv = ["train", "--cache", store, "--out", finished, *TRAIN_ARGS]
    code, _, err = run_cli(capsys, argv)
    line = assert_one_error_line(code, err)
    assert code == 2 and line == f"error: {finished} holds a finished run; pass --overwrite to replace it, or choose " \
        "another --out", line
    assert _files(finished) == before  # untouched, byte for byte
    code, _, err = run_cli(capsys, [*argv, "--resume", "--overwrite"])
    assert "choose one" in assert_one_error_line(code, err) and _files(finished) == before
    main([*map(str, argv), "--overwrite"])  # replaced: a new, finished run
    after = _files(finished)
    assert set(after) == set(before) and after["metrics.json"] != before["metrics.json"]
    assert json.loads((finished / "config.json").read_text())["finished"] is True

    unfinished = tmp_path / "unfinished"
    assert train.run(train_cfg(store, unfinished, epochs=2), stop_after_steps=1) == {"stopped_at": 1}
    before = _files(unfinished)
    again = ["train", "--cache", str(store), "--out", str(unfinished), *TRAIN_ARGS, "--epochs", "2", "--ema-decay", "0.9"]
    code, _, err = run_cli(capsys, again)
    line = assert_one_error_line(code, err)
    assert code == 2 and line == f"error: {unfinished} holds an unfinished run (checkpoint at step 1); pass --resume " \
        "to continue it or --overwrite to start again", line
    assert _files(unfinished) == before and "metrics.json" not in before
    main([*again, "--resume"])
    assert json.loads((unfinished / "metrics.json").read_text())["epochs"] == 2


def test_overwrite_removes_the_old_runs_finished_markers_before_training(store, checkpoint, tmp_path, monkeypatch):
    """An --overwrite run stopped before it finishes leaves nothing that looks finished."""
    import shutil

    from reliability_helpers import train_cfg

    from pipeline.train import trainer
    from stages import train

    out = tmp_path / "run"
    shutil.copytree(checkpoint, out)
    seen = []

    def step(self, global_step, batch, inputs):
        seen.append(sorted(str(p.relative_to(out)) for p in out.rglob("*")))
        raise KeyboardInterrupt

    assert (out / "dvclive" / "metrics.json").exists()  # the old run's DVCLive summary, to be removed
    monkeypatch.setattr(trainer.Trainer, "step", step)
    with pytest.raises(KeyboardInterrupt):
        train.run(train_cfg(store, out, overwrite=True))
    # only the new run's (empty) DVCLive folder: no run file and none of the old run's metrics
    assert seen == [["dvclive"]] and not (out / "metrics.json").exists() and not (out / "config.json").exists()


# Flag names that several stages share, each with its ONE meaning. A name shared by two stages that
# is not listed here fails the test below until someone states what it means everywhere (or renames
# it): `--real` once named a folder of splits in `extract` and one split in `generate`, `--model` an
# external UNet in `diffusion` and the stage's folder elsewhere, `--name` a key prefix and a label.
SHARED_FLAGS = {
    "arch": "the classifier architecture", "attack_steps": "PGD steps of the training attack",
    "batch_size": "images per forward/step of this stage", "bf16": "bf16 autocast where it is native",
    "checkpoint_every": "steps between checkpoints", "chunks_per_shard": "zarr chunks per store shard",
    "device": "auto | cpu | cuda", "ema_decay": "EMA of the saved weights", "eps": "Linf budget",
    "layer": "UNet block of a target set", "limit": "the first N samples (0: all)",
    "lr": "peak learning rate", "memory_budget_mb": "the target reader's streaming threshold",
    "model": "a diffusion model folder to read", "n": "number of images", "out": "what the stage writes",
    "seed": "the stage's randomness", "shard_size": "samples per tar shard",
    "shards": "ONE split's shard folder", "source": "a raw dataset", "t": "timestep of a target set",
    "view_flip": "random flips of the view spec", "view_pad": "crop padding of the view spec",
    "views": "K views per image",
}


def test_a_flag_name_shared_by_stages_has_one_stated_meaning():
    from collections import defaultdict

    from pipeline.cli import _flags, config_class

    stages_of = defaultdict(set)
    for stage in STAGES:
        for name, *_ in _flags(config_class(stage)):
            stages_of[name].add(stage)
    unstated = sorted(n for n, s in stages_of.items() if len(s) > 1 and n not in SHARED_FLAGS)
    assert not unstated, f"flag names shared by stages with no stated single meaning: {unstated}"
    # the renamed collisions stay renamed: the train split of generate, the splits of extract, the
    # external UNet of diffusion, prepare's key prefix
    assert "real" not in stages_of and "name" not in stages_of["prepare"]
    assert "model" not in stages_of["diffusion"] and "pretrained" in {n for n, *_ in _flags(config_class("diffusion"))}
    assert {"real_splits"} <= {n for n, *_ in _flags(config_class("extract"))}
    assert {"real_train", "real_test"} <= {n for n, *_ in _flags(config_class("generate"))}

"""Helpers shared by the stage-reliability tests (test_damaged_caches, test_bad_input,
test_code_from_files, test_output_safety) and by the ``store``/``checkpoint`` fixtures in conftest.py:
small stage configs, in-process CLI calls, and the one-``error:``-line check.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from pipeline.cache.config import ExtractConfig
from pipeline.cli import main
from pipeline.train.config import TrainConfig


def extract_cfg(model_dir: Path, real: Path, out: Path, **kw) -> ExtractConfig:
    base = ExtractConfig(model=str(model_dir), real_splits=str(real), synthetic="", out=str(out), views=2,
                         batch_size=128, rows_per_chunk=16, chunks_per_shard=2, limit=64)
    return replace(base, **kw)


TRAIN_ARGS = ["--real-limit", "0", "--epochs", "1", "--batch-size", "32", "--attack-steps", "1",
              "--head-hidden", "16"]


def train_cfg(store: Path, out: Path, **kw) -> TrainConfig:
    base = TrainConfig(cache=str(store), out=str(out), real_limit=0, epochs=1, batch_size=32, attack_steps=1,
                       head_hidden=16, ema_decay=0.9)
    return replace(base, **kw)


def run_cli(capsys, argv: list[str]) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of one in-process CLI call; any exception that escapes fails."""
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in argv])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def assert_one_error_line(code: int, err: str) -> str:
    """Exit != 0, no traceback, exactly one ``error:`` line and it is the last one (progress bars
    of work already started may precede it). Returns that line."""
    lines = [ln for ln in err.replace("\r", "\n").splitlines() if ln.strip()]
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], err
    return errors[0]


def _no_training(*args, **kw):
    """Patched over the first step of a stage that must refuse its input before doing any work."""
    raise AssertionError("training started on a store that should have been refused")

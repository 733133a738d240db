"""`pipeline bench --profile gpu` (scripts/gpu_check.sh): the GPU figures' code paths, run at tiny size on the CPU
(--dry-run), and its refusal on a machine without a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.e2e
def test_dry_run_prints_every_figure(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    res = json.loads(out.read_text())
    for key in ("extract_views_per_s_fp32", "bare_forward_views_per_s_bf16", "cnn_plain_s_per_step",
                "cnn_cached_over_plain", "cnn_online_over_cached", "online_vs_cpu_fp32_min_cosine"):
        assert key in res and key in proc.stdout, key
    assert res["online_vs_cpu_fp32_min_cosine"] >= 0.999 and res["online_dtype"] == "torch.float32"


def test_without_a_gpu_it_says_so_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("a CUDA GPU is here: the refusal is for machines without one")
    proc = subprocess.run([sys.executable, "-m", "pipeline", "bench", "--profile", "gpu", "--out", str(tmp_path / "x.json")],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        "error: no CUDA GPU here; use --dry-run to check the GPU profile's code paths on the CPU"], proc.stderr
    assert not (tmp_path / "x.json").exists()

"""`pipeline bench --profile gpu` (scripts/gpu_check.sh): the GPU figures' code paths, run at tiny size on the CPU
(--dry-run), and its refusal on a machine without a GPU."""

from __future__ import annotations

import json
import os
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


@pytest.mark.e2e
def test_every_stage_end_to_end_script_runs_and_reports_what_ran(tmp_path):
    """scripts/gpu_e2e.sh at tiny size on this machine's device: every stage runs, and the summary
    names the device and precision each output recorded."""
    env = dict(os.environ, LIMIT="200", SYNTHETIC="32", DIFFUSION_STEPS="3", EPOCHS="1", VIEWS="2",
               WORK=str(tmp_path / "e2e"), OMP_NUM_THREADS="1")
    proc = subprocess.run(["bash", "scripts/gpu_e2e.sh"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    summary = {line.split(":")[0]: line for line in proc.stdout.splitlines() if ": " in line}
    assert f"device={device}" in summary["run/metrics.json"] and f"device={device}" in summary["eval.json"]
    assert "precision=" in summary["diffusion/model_info.json"] and "precision=" in summary["shards/synthetic/generate.json"]
    assert json.loads((tmp_path / "e2e" / "eval.json").read_text())["checks"]["pgd_le_clean"] is True


def test_end_to_end_script_never_deletes_a_folder_it_did_not_make(tmp_path):
    (tmp_path / "precious.txt").write_text("keep")
    proc = subprocess.run(["bash", "scripts/gpu_e2e.sh"], cwd=ROOT, env=dict(os.environ, WORK=str(tmp_path)),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.strip().splitlines() == [
        f"error: {tmp_path} exists and is not an earlier output of this script; choose another WORK"]
    assert (tmp_path / "precious.txt").read_text() == "keep"

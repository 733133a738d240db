"""The committed diffusion model (models/fmnist-ddpm-3000): what a study reuses instead of re-training.
Its files are the ones its SHA256SUMS names, it loads with the pipeline's loader (which checks the
weights against model_info.json), and its record says what it saw: the real train split only."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from pipeline.diffusion.model import load_model

MODEL = Path(__file__).resolve().parents[1] / "models" / "fmnist-ddpm-3000"


def test_files_match_their_checksums():
    lines = (MODEL / "SHA256SUMS").read_text().split("\n")
    sums = dict(reversed(line.split("  ", 1)) for line in lines if line)
    assert {"unet/diffusion_pytorch_model.safetensors", "unet/config.json", "model_info.json"} <= set(sums)
    for rel, digest in sums.items():
        assert hashlib.sha256((MODEL / rel).read_bytes()).hexdigest() == digest, rel


def test_loads_and_records_what_it_saw():
    model = load_model(str(MODEL))
    info = json.loads((MODEL / "model_info.json").read_text())
    assert model.weights_sha256 == info["weights_sha256"]
    assert model.num_classes == 10 and model.null_class == 10 and model.image_size == 28
    # trained here, on all 60k real Fashion-MNIST train images and nothing else (no test image)
    assert info["trained"] is True and info["data"]["count"] == 60000 and info["config"]["limit"] == 0
    assert info["data"]["path"].endswith("shards/real/train") and info["config"]["steps"] == 3000
    x = torch.zeros((2, 1, 28, 28))
    out = model.unet(x, torch.tensor([10, 10]), class_labels=torch.tensor([0, 10])).sample
    assert out.shape == x.shape and torch.isfinite(out).all()

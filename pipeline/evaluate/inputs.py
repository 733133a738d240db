"""The library behind stage `evaluate` (its recipe: stages/evaluate.py): settings and output checks,
test images checked against the checkpoint, the device, the result files."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from pipeline.core.errors import UserError, check_out
from pipeline.core.runtime import Dist
from pipeline.core.shards import read_split
from pipeline.core.storage import atomic_write
from pipeline.core.views import to_float01
from pipeline.evaluate.config import EvaluateConfig


def check_config(cfg: EvaluateConfig) -> None:
    cfg.validate()
    check_out(cfg.out, folder=False)
    check_out(str(metrics_path(cfg)), folder=False, flag="--metrics")


def attack_budget(requested: float, mcfg: dict, checkpoint: str) -> tuple[float, str]:
    """(eps, where it came from): ``--eps`` when given, else the eps the checkpoint was trained at
    (its config.json: ``eps``, or ``train.eps`` of a run from before it was recorded). The threat
    model is Linf, the only one training uses; a checkpoint recording another is refused."""
    threat = mcfg.get("threat_model", "Linf")
    if threat != "Linf":
        raise UserError(f"{checkpoint}: trained under threat model {threat!r}; evaluate measures Linf robustness")
    if requested > 0:
        return float(requested), "--eps"
    train = mcfg.get("train") if isinstance(mcfg.get("train"), dict) else {}
    eps = mcfg.get("eps", train.get("eps"))
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not 0 < eps <= 1:
        raise UserError(f"{checkpoint}: records no training eps in (0, 1] (got {eps!r}); pass --eps (e.g. 8/255)")
    return float(eps), "checkpoint"


def metrics_path(cfg: EvaluateConfig) -> Path:
    out = Path(cfg.out)
    return Path(cfg.metrics) if cfg.metrics else out.with_name(out.stem + ".metrics.json")


def load_test_images(shards: str, n: int, image_shape: tuple, num_classes: int, *, offset: int = 0,
                     trained_on: dict | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images [offset, offset + n) of the shards as float (N,C,H,W) in [0,1], refusing a shape/class
    mismatch and any image the checkpoint trained on (``trained_on``: split content hash -> rows
    [0, rows) of that split were training data)."""
    split = read_split(shards, limit=offset + n)
    if len(split.labels) <= offset:
        raise UserError(f"{shards}: --offset {offset} is past the {len(split.labels)} images of these shards")
    trained_on = trained_on or {}
    if not isinstance(trained_on, dict) or not all(
            isinstance(k, str) and type(v) is int and v >= 0 for k, v in trained_on.items()):
        raise UserError("the checkpoint's trained_on record is malformed (want content hash -> non-negative row "
                        "count); it cannot tell which images it trained on")
    seen = trained_on.get(split.fingerprint.get("content_hash"))
    if seen is not None and offset < seen:
        raise UserError(f"{shards}: images [{offset}, {offset + n}) overlap the first {seen} images of this split, "
                        f"which the checkpoint trained on; evaluate from --offset {seen} or later")
    images, labels = split.images[offset:], split.labels[offset:]
    h, w, c = images.shape[1:]
    if (c, h, w) != tuple(image_shape):
        raise UserError(f"{shards}: images are {c}x{h}x{w}, the checkpoint expects "
                        f"{'x'.join(map(str, image_shape))}")
    if labels.max() >= num_classes:
        raise UserError(f"{shards}: label {labels.max()} but the checkpoint has {num_classes} classes")
    x = to_float01(images)
    return x.contiguous(), torch.from_numpy(np.ascontiguousarray(labels))


def read_train_metrics(folder: Path) -> dict:
    """The training stage's final metrics (train time etc.), if it wrote them; {} otherwise."""
    try:
        data = json.loads((folder / "metrics.json").read_text())
        return data if isinstance(data, dict) else {}
    except (OSError, json.JSONDecodeError):
        return {}


def write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(obj, indent=2) + "\n")


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

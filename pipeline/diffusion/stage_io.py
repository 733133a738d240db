"""The library behind stage `diffusion` (its recipe: stages/diffusion.py): settings checks, the
checkpoint folder, an existing model used as it is, the loss plot."""

from __future__ import annotations

import json
from pathlib import Path

from pipeline.core import storage
from pipeline.core.errors import UserError, check_out
from pipeline.diffusion.config import DiffusionConfig
from pipeline.diffusion.model import load_model, pointer_info

SIGNATURE = ("model_info.json",)  # the file that marks a finished output folder of this stage


def ckpt_dir(out: str) -> Path:
    return Path(out).with_name(Path(out).name + ".ckpt")


def check(cfg: DiffusionConfig) -> None:
    """Refuse bad settings before any heavy work."""
    cfg.validate()
    check_out(cfg.out, folder=True)
    storage.refuse_foreign(cfg.out, SIGNATURE)
    ckpt = ckpt_dir(cfg.out)
    if not storage.is_url(cfg.out) and ckpt.exists() and (not ckpt.is_dir() or any(
            not p.name.startswith("step-") for p in ckpt.iterdir())):
        raise UserError(f"{ckpt} exists and holds more than this stage's step-* checkpoints (it is removed "
                        "after training): it is left as it is; remove it or choose another --out")


def loss_plot(losses: list[tuple[int, float]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, vals = zip(*losses)
    k = max(1, len(vals) // 50)  # running mean over ~2% of the run
    smooth = [sum(vals[max(0, i - k + 1): i + 1]) / len(vals[max(0, i - k + 1): i + 1]) for i in range(len(vals))]
    fig, ax = plt.subplots(figsize=(5, 3.2))
    ax.plot(steps, vals, alpha=0.3, lw=0.8, label="step")
    ax.plot(steps, smooth, lw=1.5, label=f"mean of {k}")
    ax.set_xlabel("step"), ax.set_ylabel("MSE (epsilon)"), ax.set_yscale("log")
    ax.legend(), ax.set_title("diffusion training loss")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def use_existing(cfg: DiffusionConfig) -> dict:
    model = load_model(cfg.pretrained)  # raises UserError for a bad path / unreachable hub
    info = pointer_info(model, cfg.pretrained)
    tmp = Path(storage.start(cfg.out, signature=SIGNATURE))
    (tmp / "model_info.json").write_text(json.dumps(info, indent=2))
    storage.commit(str(tmp), cfg.out, signature=SIGNATURE)
    kind = f"{model.num_classes} classes" if model.conditional else "unconditional"
    print(f"using {info['source']} ({kind}, {model.image_size} px) -> {cfg.out}/model_info.json")
    return info

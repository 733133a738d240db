"""Stage `generate`: a diffusion model -> labelled synthetic images as webdataset shards.

Output folder (written as OUT.tmp and renamed, so OUT is complete or absent)::

    OUT/train/       shards + fingerprint.json, same schema as `prepare` (keys syn-train-NNNNNNN)
    OUT/grid.png     samples per class, one row per class
    OUT/generate.json  settings, timings, and the label check (agreement, classifier test accuracy)

Labels: a class-conditional model gets class-balanced labels (sample i has label i mod K); an
unconditional model's samples are labelled by a standard classifier trained on the real shards,
keeping those with softmax confidence >= ``min_confidence``.

Check ("agreement"): a standard classifier trained on the real data labels the generated images;
the share that it assigns to the intended class says the samples are recognisable per class.
For an unconditional model the labels are that classifier's, so only its test accuracy is told.

GPU setting (a 32 px CIFAR model): ``--n 1000000 --batch-size 1000 --sampler dpm --sample-steps
25 --guidance 1.5 --shard-size 50000``; under ``accelerate launch`` see ``generate_shards``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.config import GenerateConfig
from pipeline.diffusion import DiffusionModel, atomic_folder, commit_folder, load_model
from pipeline.errors import UserError, check_out
from pipeline.sampling import SAMPLERS, class_grid, make_sampler, sample
from pipeline.shards import make_keys, read_fingerprint, read_split, write_split
from pipeline.sources import Split

KEY_PREFIX = "syn"


def check(cfg: GenerateConfig) -> None:
    if cfg.n <= 0 or cfg.batch_size <= 0 or cfg.shard_size <= 0 or cfg.sample_steps <= 0:
        raise UserError("--n, --batch-size, --shard-size and --sample-steps must be positive")
    if cfg.sampler not in SAMPLERS:
        raise UserError(f"unknown --sampler {cfg.sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if not 0.0 <= cfg.eta <= 1.0:
        raise UserError(f"--eta must be in [0, 1], got {cfg.eta}")
    if cfg.guidance < 0 or not 0.0 <= cfg.min_confidence < 1.0:
        raise UserError(f"--guidance must be >= 0 and --min-confidence in [0, 1), got "
                        f"{cfg.guidance}, {cfg.min_confidence}")
    if cfg.classifier_epochs <= 0 or cfg.classifier_limit < 0:
        raise UserError("--classifier-epochs must be positive and --classifier-limit >= 0")
    check_out(cfg.out, folder=True)


def batches(start: int, stop: int, shard_size: int, batch_size: int) -> list[tuple[int, int]]:
    """Batches of [start, stop) that never cross a shard boundary (see pipeline.sampling)."""
    out = []
    for s0 in range(start - start % shard_size, stop, shard_size):
        lo, hi = max(start, s0), min(stop, s0 + shard_size)
        out += [(b, min(hi, b + batch_size)) for b in range(lo, hi, batch_size)]
    return out


def generate_range(model: DiffusionModel, cfg: GenerateConfig, start: int, stop: int,
                   labels: np.ndarray | None, device: str, progress: bool = True) -> np.ndarray:
    """Samples start..stop-1 as uint8 (N,H,W,C); labels[i] is the class of sample i (or None)."""
    from tqdm import tqdm

    out = []
    for lo, hi in tqdm(batches(start, stop, cfg.shard_size, cfg.batch_size), desc="generate",
                       mininterval=2, disable=not progress):
        y = None if labels is None else torch.from_numpy(labels[lo:hi]).long()
        out.append(sample(model, range(lo, hi), y, seed=cfg.seed, sampler=cfg.sampler,
                          steps=cfg.sample_steps, eta=cfg.eta, guidance=cfg.guidance, bf16=cfg.bf16,
                          device=device))
    return np.concatenate(out)


def real_classifier(cfg: GenerateConfig, num_classes: int):
    from pipeline.classify import train_classifier

    real = read_split(cfg.real, limit=cfg.classifier_limit, progress=True)
    if int(real.fingerprint["num_classes"]) != num_classes:
        raise UserError(f"{cfg.real} has {real.fingerprint['num_classes']} classes, the model {num_classes}")
    return train_classifier(real.images, real.labels, num_classes, epochs=cfg.classifier_epochs, seed=cfg.seed,
                            nuisance=cfg.classifier_nuisance)


def pseudo_labelled(model: DiffusionModel, cfg: GenerateConfig, clf, device: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Sample candidates in rounds of n until n pass the confidence filter (at most 20 rounds)."""
    from pipeline.classify import predict

    kept_x, kept_y, tried = [], [], 0
    while sum(map(len, kept_y)) < cfg.n:
        if tried >= 20 * cfg.n:
            raise UserError(f"only {sum(map(len, kept_y))} of {tried} samples reached confidence "
                            f"{cfg.min_confidence}; lower --min-confidence")
        x = generate_range(model, cfg, tried, tried + cfg.n, None, device)
        pred, conf = predict(clf, x)
        keep = conf >= cfg.min_confidence
        kept_x.append(x[keep]), kept_y.append(pred[keep])
        tried += cfg.n
    return np.concatenate(kept_x)[: cfg.n], np.concatenate(kept_y)[: cfg.n], tried


def save_grid(images: np.ndarray, labels: np.ndarray, classes: list[str], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = class_grid(images, labels, len(classes))
    h = images.shape[1]
    fig, ax = plt.subplots(figsize=(6.5, 0.62 * len(classes) + 0.6))
    ax.imshow(grid.squeeze(-1) if grid.shape[-1] == 1 else grid, cmap="gray", vmin=0, vmax=255)
    ax.set_yticks([h * k + h / 2 for k in range(len(classes))], classes, fontsize=8)
    ax.set_xticks([])
    ax.set_title("generated samples (one row per intended class)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(cfg: GenerateConfig) -> dict:
    check(cfg)
    model = load_model(cfg.model)
    if cfg.guidance != 1.0 and not model.conditional:
        raise UserError(f"{cfg.model} is unconditional: classifier-free guidance (--guidance) needs labels")
    make_sampler(model, cfg.sampler, cfg.sample_steps)  # refuses bad steps before any heavy work
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.unet.to(device)
    num_classes = model.num_classes if model.conditional else _num_classes_of(cfg.real)
    clf = real_classifier(cfg, num_classes) if cfg.check or not model.conditional else None
    classes = _classes(cfg, num_classes)
    t0 = time.time()
    if model.conditional:
        labels = np.arange(cfg.n, dtype=np.int64) % num_classes
        images, tried = generate_range(model, cfg, 0, cfg.n, labels, device), cfg.n
    else:
        images, labels, tried = pseudo_labelled(model, cfg, clf, device)
    seconds = time.time() - t0
    report = {"n": cfg.n, "candidates": tried, "seconds": round(seconds, 1),
              "images_per_second": round(tried / seconds, 2), "model": model.source,
              "weights_sha256": model.weights_sha256, "conditional": model.conditional,
              "config": asdict(cfg), **_label_check(cfg, clf, images, labels, model.conditional)}
    tmp = atomic_folder(cfg.out)
    write_split(tmp / "train", Split(images, labels, list(classes)), make_keys(KEY_PREFIX, "train", len(labels)),
                shard_size=cfg.shard_size, source=model.source,
                extra={"split": "train", "name": KEY_PREFIX, "synthetic": {
                    "model": model.source, "weights_sha256": model.weights_sha256, "sampler": cfg.sampler,
                    "sample_steps": cfg.sample_steps, "eta": cfg.eta, "guidance": cfg.guidance, "seed": cfg.seed}})
    save_grid(images, labels, list(classes), tmp / "grid.png")
    (tmp / "generate.json").write_text(json.dumps(report, indent=2))
    commit_folder(tmp, cfg.out)
    print(f"generate: {len(labels)} images in {seconds:.0f} s ({report['images_per_second']} img/s); "
          f"agreement {report.get('agreement')}, classifier test accuracy "
          f"{report.get('classifier_test_accuracy')} -> {cfg.out}")
    return report


def _label_check(cfg: GenerateConfig, clf, images: np.ndarray, labels: np.ndarray, conditional: bool) -> dict:
    if clf is None:
        return {}
    from pipeline.classify import accuracy, predict

    out: dict = {"classifier": "cnn, plain CE on real train" + (", background/noise nuisance augmentation"
                                                             if cfg.classifier_nuisance else "")}
    if conditional:
        pred, _ = predict(clf, images)
        out["agreement"] = round(float((pred == labels).mean()), 4)
        out["agreement_per_class"] = [round(float((pred[labels == k] == k).mean()), 4)
                                      for k in range(int(labels.max()) + 1)]
    else:
        out["labels"] = f"pseudo-labels, softmax confidence >= {cfg.min_confidence}"
    if cfg.real_test and Path(cfg.real_test).exists():
        test = read_split(cfg.real_test)
        out["classifier_test_accuracy"] = round(accuracy(clf, test.images, test.labels), 4)
    return out


def _num_classes_of(split_dir: str) -> int:
    return int(read_fingerprint(split_dir)["num_classes"])


def _classes(cfg: GenerateConfig, num_classes: int) -> list[str]:
    """Class names from the real shards, else the model's model_info.json, else 0..K-1."""
    if (Path(cfg.real) / "fingerprint.json").is_file():
        names = read_fingerprint(cfg.real).get("classes")
        if names and len(names) == num_classes:
            return list(names)
    info = Path(cfg.model) / "model_info.json"
    if info.is_file():
        names = json.loads(info.read_text()).get("classes")
        if names and len(names) == num_classes:
            return list(names)
    return [str(k) for k in range(num_classes)]

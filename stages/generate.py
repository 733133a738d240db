"""Stage `generate`: a diffusion model -> labelled synthetic images as webdataset shards.

Output folder (a path or fsspec URL; written as OUT.tmp and renamed locally, so OUT is complete or
absent; on a URL, generate.json is written last and marks it complete)::

    OUT/train/       shards + fingerprint.json, same schema as `prepare` (keys syn-train-NNNNNNN)
    OUT/grid.png     samples per class, one row per class
    OUT/generate.json  settings, timings, and the label check (agreement, classifier test accuracy)

Every output shard is a pure function of (model, settings, seed, shard index), so the work splits
by whole shards: under ``accelerate launch`` process r generates and writes the shards s with
s % world == r, rank 0 then checks them all (sha256 and the content hash, streamed shard by shard)
and writes the fingerprint, grid and report. The result equals a single-process run. Each process
holds one shard of images at a time.

Labels: a class-conditional model gets class-balanced labels (sample i has label i mod K). An
unconditional model's samples are labelled by a standard classifier trained on the real shards
(by rank 0, sent to the others), keeping those with softmax confidence >= ``min_confidence``:
shard s draws candidates from its own index range [s * shard_size * 20, ...) until it is full,
so it still depends on nothing but its index; at most 20 candidates per kept sample.

Check ("agreement"): a standard classifier trained on the real data labels the generated images;
the share that it assigns to the intended class says the samples are recognisable per class.
For an unconditional model the labels are that classifier's, so only its test accuracy is told.

GPU setting (a 32 px CIFAR model): ``--n 1000000 --batch-size 1000 --sampler dpm --sample-steps
25 --guidance 1.5 --shard-size 50000``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from pipeline import storage
from pipeline.config import GenerateConfig
from pipeline.diffusion import DiffusionModel, load_model
from pipeline.errors import UserError, check_out, refuse_non_finite
from pipeline.runtime import Dist
from pipeline.sampling import SAMPLERS, class_grid, make_sampler, sample
from pipeline.shards import (
    content_hash,
    finish_split,
    iter_shards,
    make_fingerprint,
    make_keys,
    read_fingerprint,
    read_split,
    split_exists,
    write_shard,
)

KEY_PREFIX = "syn"
SIGNATURE = ("generate.json",)  # the file that marks a finished output folder of this stage
MAX_TRIES = 20  # candidates per kept sample (unconditional model), also the index stride per shard
GRID_PER_SHARD = 100  # samples per shard kept for the grid


def check(cfg: GenerateConfig) -> None:
    refuse_non_finite(cfg)
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
    storage.refuse_foreign(cfg.out, SIGNATURE)


def generate_range(model: DiffusionModel, cfg: GenerateConfig, start: int, stop: int,
                   labels: np.ndarray | None, device: str) -> np.ndarray:
    """Samples start..stop-1 as uint8 (N,H,W,C), in batches within the range; labels[i - start] or None."""
    out = []
    for lo in range(start, stop, cfg.batch_size):
        hi = min(stop, lo + cfg.batch_size)
        y = None if labels is None else torch.from_numpy(labels[lo - start:hi - start]).long()
        out.append(sample(model, range(lo, hi), y, seed=cfg.seed, sampler=cfg.sampler,
                          steps=cfg.sample_steps, eta=cfg.eta, guidance=cfg.guidance, bf16=cfg.bf16,
                          device=device))
    return np.concatenate(out)


def shard_counts(n: int, shard_size: int) -> list[int]:
    return [min(shard_size, n - a) for a in range(0, n, shard_size)]


def real_classifier(cfg: GenerateConfig, num_classes: int):
    from pipeline.classify import train_classifier

    real = read_split(cfg.real, limit=cfg.classifier_limit, progress=True)
    if int(real.fingerprint["num_classes"]) != num_classes:
        raise UserError(f"{cfg.real} has {real.fingerprint['num_classes']} classes, the model {num_classes}")
    return train_classifier(real.images, real.labels, num_classes, epochs=cfg.classifier_epochs, seed=cfg.seed,
                            nuisance=cfg.classifier_nuisance)


def make_shard(model: DiffusionModel, cfg: GenerateConfig, s: int, count: int, clf, device: str
               ) -> tuple[np.ndarray, np.ndarray, int]:
    """Images, labels and candidates drawn for output shard s (``count`` samples)."""
    start = s * cfg.shard_size
    if model.conditional:
        labels = np.arange(start, start + count, dtype=np.int64) % model.num_classes
        return generate_range(model, cfg, start, start + count, labels, device), labels, count
    from pipeline.classify import predict

    base, tried, kept_x, kept_y = start * MAX_TRIES, 0, [], []
    while sum(map(len, kept_y)) < count:
        if tried >= MAX_TRIES * count:
            raise UserError(f"shard {s}: only {sum(map(len, kept_y))} of {tried} samples reached confidence "
                            f"{cfg.min_confidence}; lower --min-confidence")
        x = generate_range(model, cfg, base + tried, base + tried + cfg.batch_size, None, device)
        pred, conf = predict(clf, x)
        keep = conf >= cfg.min_confidence
        kept_x.append(x[keep]), kept_y.append(pred[keep])
        tried += cfg.batch_size
    return np.concatenate(kept_x)[:count], np.concatenate(kept_y)[:count], tried


def save_grid(images: np.ndarray, labels: np.ndarray, classes: list[str], path: str) -> None:
    import io

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    storage.write_bytes(path, buf.getvalue())


def run(cfg: GenerateConfig) -> dict:
    check(cfg)
    dist = Dist()
    model = load_model(cfg.model)
    if cfg.guidance != 1.0 and not model.conditional:
        raise UserError(f"{cfg.model} is unconditional: classifier-free guidance (--guidance) needs labels")
    make_sampler(model, cfg.sampler, cfg.sample_steps)  # refuses bad steps before any heavy work
    device = str(dist.device)
    model.unet.to(device)
    num_classes = model.num_classes if model.conditional else _num_classes_of(cfg.real)
    classes = _classes(cfg, num_classes)
    clf = None
    if cfg.check or not model.conditional:  # trained once, by rank 0
        clf = dist.broadcast(real_classifier(cfg, num_classes) if dist.is_main else None)
    stage = storage.start(cfg.out, signature=SIGNATURE) if dist.is_main else storage.staging_path(cfg.out)
    dist.barrier()
    counts = shard_counts(cfg.n, cfg.shard_size)
    mine = [s for s in range(len(counts)) if s % dist.world == dist.rank]
    records, agree, tried = {}, np.zeros((2, num_classes), np.int64), 0
    t0 = time.time()
    with tqdm(total=sum(counts[s] for s in mine), desc="generate", unit="img", mininterval=2,
              disable=not dist.is_main) as bar:
        for s in mine:
            images, labels, t = make_shard(model, cfg, s, counts[s], clf, device)
            keys = make_keys(KEY_PREFIX, "train", counts[s], start=s * cfg.shard_size)
            records[s] = write_shard(storage.join(stage, "train"), s, keys, images, labels)
            records[s]["labels"] = labels.tolist()
            if clf is not None and model.conditional:
                agree += _agreement_counts(clf, images, labels, num_classes)
            tried += t
            bar.update(counts[s])
    seconds = time.time() - t0
    gathered = dist.gather((records, agree, tried, seconds))
    if dist.is_main:
        report = _finish(cfg, model, stage, classes, gathered, clf)
    dist.barrier()
    return report if dist.is_main else {"out": cfg.out, "shards": mine}


def _finish(cfg: GenerateConfig, model: DiffusionModel, stage: str, classes: list[str], gathered: list,
            clf) -> dict:
    """Rank 0: check every shard, write fingerprint, grid and report, commit the folder."""
    records = {s: r for part in gathered for s, r in part[0].items()}
    shards = [records[s] for s in range(len(records))]
    labels = np.concatenate([np.asarray(r.pop("labels"), np.int64) for r in shards])
    keys = make_keys(KEY_PREFIX, "train", len(labels))
    split_dir = storage.join(stage, "train")
    grid_images, grid_labels, image_shape = [], [], None

    def blocks():  # every shard read back once: sha256 checked, pixels hashed, grid samples kept
        nonlocal image_shape
        for _, im, lab in iter_shards(split_dir, shards):
            image_shape = list(im.shape[1:])
            grid_images.append(im[:GRID_PER_SHARD]), grid_labels.append(lab[:GRID_PER_SHARD])
            yield im

    content = content_hash(keys, blocks(), labels)
    fp = make_fingerprint(keys, image_shape, classes, shards, content, source=model.source, extra={
        "split": "train", "name": KEY_PREFIX, "synthetic": {
            "model": model.source, "weights_sha256": model.weights_sha256, "sampler": cfg.sampler,
            "sample_steps": cfg.sample_steps, "eta": cfg.eta, "guidance": cfg.guidance, "seed": cfg.seed}})
    finish_split(split_dir, fp)
    seconds = max(part[3] for part in gathered)
    tried = sum(part[2] for part in gathered)
    report = {"n": cfg.n, "candidates": tried, "seconds": round(seconds, 1),
              "images_per_second": round(tried / max(seconds, 1e-9), 2), "processes": len(gathered),
              "model": model.source, "weights_sha256": model.weights_sha256, "conditional": model.conditional,
              "config": asdict(cfg),
              **_label_check(cfg, clf, sum(part[1] for part in gathered), model.conditional)}
    save_grid(np.concatenate(grid_images), np.concatenate(grid_labels), classes, storage.join(stage, "grid.png"))
    storage.write_bytes(storage.join(stage, "generate.json"), json.dumps(report, indent=2).encode())
    storage.commit(stage, cfg.out, signature=SIGNATURE)
    print(f"generate: {cfg.n} images in {seconds:.0f} s ({report['images_per_second']} img/s, "
          f"{len(gathered)} process(es)); agreement {report.get('agreement')}, classifier test accuracy "
          f"{report.get('classifier_test_accuracy')} -> {cfg.out}")
    return report


def _agreement_counts(clf, images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(2, K): per intended class, how many the real-data classifier agrees with, and how many there are."""
    from pipeline.classify import predict

    pred, _ = predict(clf, images)
    return np.stack([np.bincount(labels[pred == labels], minlength=num_classes),
                     np.bincount(labels, minlength=num_classes)])


def _label_check(cfg: GenerateConfig, clf, agree: np.ndarray, conditional: bool) -> dict:
    if clf is None:
        return {}
    from pipeline.classify import accuracy

    out: dict = {"classifier": "cnn, plain CE on real train" + (", background/noise nuisance augmentation"
                                                             if cfg.classifier_nuisance else "")}
    if conditional:
        out["agreement"] = round(float(agree[0].sum() / agree[1].sum()), 4)
        out["agreement_per_class"] = [round(float(a / t), 4) for a, t in zip(*agree) if t > 0]
    else:
        out["labels"] = f"pseudo-labels, softmax confidence >= {cfg.min_confidence}"
    if cfg.real_test and split_exists(cfg.real_test):
        test = read_split(cfg.real_test)
        out["classifier_test_accuracy"] = round(accuracy(clf, test.images, test.labels), 4)
    return out


def _num_classes_of(split_dir: str) -> int:
    return int(read_fingerprint(split_dir)["num_classes"])


def _classes(cfg: GenerateConfig, num_classes: int) -> list[str]:
    """Class names from the real shards, else the model's model_info.json, else 0..K-1."""
    if split_exists(cfg.real):
        names = read_fingerprint(cfg.real).get("classes")
        if names and len(names) == num_classes:
            return list(names)
    info = Path(cfg.model) / "model_info.json"
    if info.is_file():
        names = json.loads(info.read_text()).get("classes")
        if names and len(names) == num_classes:
            return list(names)
    return [str(k) for k in range(num_classes)]

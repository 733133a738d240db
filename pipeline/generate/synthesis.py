"""The library behind stage `generate` (its recipe: stages/generate.py): sampling shards of labelled
images, rejection sampling of an unconditional model's candidates, the real-data classifier's
agreement check, the sample grid."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from pipeline.core import storage
from pipeline.core.errors import UserError, check_out
from pipeline.core.runtime import cpu_model, precision
from pipeline.core.shards import (
    content_hash,
    finish_split,
    iter_shards,
    make_fingerprint,
    make_keys,
    read_fingerprint,
    read_split,
    split_exists,
)
from pipeline.core.views import to_float01
from pipeline.diffusion.model import DiffusionModel
from pipeline.generate.config import Filter, GenerateConfig
from pipeline.generate.labeller import (
    REFERENCE_DIR,
    Reference,
    accuracy,
    fit_reference,
    load_reference,
    predict,
    save_reference,
)
from pipeline.generate.quality import frechet_distance, gaussian_stats, precision_recall
from pipeline.generate.sampling import class_grid, sample

SIGNATURE = ("generate.json",)  # the file that marks a finished output folder of this stage

KEY_PREFIX = "syn"


MAX_TRIES = 20  # candidates per kept sample (unconditional model), also the index stride per shard


GRID_PER_SHARD = 100  # samples per shard kept for the grid


def check(cfg: GenerateConfig) -> None:
    cfg.validate()
    check_out(cfg.out, folder=True, urls=True)
    storage.refuse_foreign(cfg.out, SIGNATURE)


def generate_range(model: DiffusionModel, cfg: GenerateConfig, start: int, stop: int,
                   labels: np.ndarray | None, device: str, progress: Callable[[int], None] | None = None) -> np.ndarray:
    """Samples start..stop-1 as uint8 (N,H,W,C), in batches within the range; labels[i - start] or None.
    ``progress(k)`` after each batch of k."""
    out = []
    for lo in range(start, stop, cfg.batch_size):
        hi = min(stop, lo + cfg.batch_size)
        y = None if labels is None else torch.from_numpy(labels[lo - start:hi - start]).long()
        out.append(sample(model, range(lo, hi), y, seed=cfg.seed, sampler=cfg.sampler,
                          steps=cfg.sample_steps, eta=cfg.eta, guidance=cfg.guidance, bf16=cfg.bf16,
                          device=device))
        if progress is not None:
            progress(hi - lo)
    return np.concatenate(out)


def shard_counts(n: int, shard_size: int) -> list[int]:
    return [min(shard_size, n - a) for a in range(0, n, shard_size)]


def reference_classifier(cfg: GenerateConfig, num_classes: int, image_shape: tuple[int, int]) -> Reference:
    """The run's reference classifier: ``--reference`` loaded, or trained on the real train split."""
    if cfg.reference:
        return load_reference(cfg.reference, num_classes, image_shape)
    return fit_reference(cfg.real_train, num_classes, arch=cfg.classifier_arch.value, epochs=cfg.classifier_epochs,
                         limit=cfg.classifier_limit, seed=cfg.seed, nuisance=cfg.classifier_nuisance)


def make_shard(model: DiffusionModel, cfg: GenerateConfig, s: int, count: int, clf, device: str,
               progress: Callable[[int], None] | None = None) -> tuple[np.ndarray, np.ndarray, int, np.ndarray | None]:
    """Images, labels, candidates drawn for output shard s (``count`` samples), and the reference
    classifier's (2, K) agreement counts over ALL candidates of a conditional model (None without
    a classifier): the generator's own label quality, before any filter. ``progress(k)``: k more of the
    shard's ``count`` samples are done (after each batch; they add up to ``count``).

    A conditional model without ``--filter`` samples label i mod K for sample i. Otherwise the
    shard draws candidates from its own index range [s * shard_size * MAX_TRIES, ...) (so it
    depends on its index only) and keeps, in candidate order: ``agree``: candidates the classifier
    assigns to their intended class with confidence >= min_confidence, up to each class's quota of
    the shard (label i mod K, so the set stays balanced); ``relabel`` and unconditional models:
    candidates whose predicted class reaches the confidence, labelled with it (pseudo-labels)."""
    start, k = s * cfg.shard_size, model.num_classes
    if model.conditional and cfg.filter == Filter.none:
        labels = np.arange(start, start + count, dtype=np.int64) % k
        images = generate_range(model, cfg, start, start + count, labels, device, progress)
        return images, labels, count, None if clf is None else agreement_counts(clf, images, labels, k)
    base, tried, kept_x, kept_y = start * MAX_TRIES, 0, [], []
    raw = np.zeros((2, k), np.int64) if model.conditional else None
    quota = np.bincount(np.arange(start, start + count) % k, minlength=k) if model.conditional else None
    done = 0  # samples reported to ``progress``
    while (have := sum(map(len, kept_y))) < count:
        if progress is not None and have > done:
            progress(have - done)
            done = have
        if tried >= MAX_TRIES * count:
            how = f"--filter {cfg.filter.value}" if model.conditional else "pseudo-labels"
            raise UserError(f"shard {s}: only {sum(map(len, kept_y))} of {tried} samples passed the reference "
                            f"classifier ({how}, confidence {cfg.min_confidence}); lower --min-confidence or "
                            "improve the model")
        lo, hi = base + tried, base + tried + cfg.batch_size
        intended = np.arange(lo, hi, dtype=np.int64) % k if model.conditional else None
        x = generate_range(model, cfg, lo, hi, intended, device)
        pred, conf = predict(clf, x)
        tried += hi - lo
        if intended is None or cfg.filter == Filter.relabel:
            if raw is not None:
                raw += counts_of(pred, intended, k)
            keep = conf >= cfg.min_confidence
            kept_x.append(x[keep]), kept_y.append(pred[keep])
            continue
        raw += counts_of(pred, intended, k)
        keep = np.zeros(len(x), bool)
        for i in np.flatnonzero((pred == intended) & (conf >= cfg.min_confidence)):
            if quota[intended[i]] > 0:
                quota[intended[i]] -= 1
                keep[i] = True
        kept_x.append(x[keep]), kept_y.append(intended[keep])
    if progress is not None:
        progress(count - done)
    return np.concatenate(kept_x)[:count], np.concatenate(kept_y)[:count], tried, raw


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


def finish(cfg: GenerateConfig, model: DiffusionModel, stage: str, classes: list[str], gathered: list,
            ref: Reference | None) -> dict:
    """Rank 0: check every shard, write fingerprint, grid and report, commit the folder."""
    records = {s: r for part in gathered for s, r in part[0].items()}
    shards = [records[s] for s in range(len(records))]
    labels = np.concatenate([np.asarray(r.pop("labels"), np.int64) for r in shards])
    keys = make_keys(KEY_PREFIX, "train", len(labels))
    split_dir = storage.join(stage, "train")
    grid_images, grid_labels, image_shape, sample = [], [], None, []

    def blocks():  # every shard read back once: sha256 checked, pixels hashed, grid and quality samples kept
        nonlocal image_shape
        for _, im, lab in iter_shards(split_dir, shards):
            image_shape = list(im.shape[1:])
            grid_images.append(im[:GRID_PER_SHARD]), grid_labels.append(lab[:GRID_PER_SHARD])
            sample.append(im[:max(0, cfg.quality_n - sum(map(len, sample)))])
            yield im

    content = content_hash(keys, blocks(), labels)
    seconds = max(part[3] for part in gathered)
    tried = sum(part[2] for part in gathered)
    kept = {"filter": cfg.filter.value if model.conditional else "pseudo-labels",
            **({"min_confidence": cfg.min_confidence} if cfg.filter != Filter.none or not model.conditional else {}),
            "candidates": tried, "kept_fraction": round(cfg.n / tried, 4)}
    fp = make_fingerprint(keys, image_shape, classes, shards, content, source=model.source, extra={
        "split": "train", "name": KEY_PREFIX, "synthetic": {
            "model": model.source, "weights_sha256": model.weights_sha256, "sampler": cfg.sampler,
            "sample_steps": cfg.sample_steps, "eta": cfg.eta, "guidance": cfg.guidance, "seed": cfg.seed, **kept}})
    finish_split(split_dir, fp)
    report = {"n": cfg.n, "candidates": tried, "kept_fraction": kept["kept_fraction"], "filter": kept["filter"],
              "seconds": round(seconds, 1),
              "images_per_second": round(tried / max(seconds, 1e-9), 2), "processes": len(gathered),
              "model": model.source, "weights_sha256": model.weights_sha256, "conditional": model.conditional,
              "model_training_steps": training_steps(cfg.model),
              # what ran, not what was asked: bf16 only where the device has it natively (images differ)
              "precision": precision(cfg.bf16, next(model.unet.parameters()).device),
              "cpu": cpu_model(),
              "config": asdict(cfg),
              **_label_check(cfg, ref, sum(part[1] for part in gathered), model.conditional),
              **({"quality": quality_report(cfg, ref.model, np.concatenate(sample))} if ref and cfg.check else {})}
    if ref is not None:  # beside the report: `--reference STAGE/reference` reuses it
        save_reference(ref, storage.join(stage, REFERENCE_DIR))
    save_grid(np.concatenate(grid_images), np.concatenate(grid_labels), classes, storage.join(stage, "grid.png"))
    storage.write_bytes(storage.join(stage, "generate.json"), json.dumps(report, indent=2).encode())
    storage.commit(stage, cfg.out, signature=SIGNATURE)
    q = report.get("quality", {})
    print(f"generate: {cfg.n} images in {seconds:.0f} s ({report['images_per_second']} img/s, "
          f"{len(gathered)} process(es)); agreement {report.get('agreement')} (reference classifier, test "
          f"accuracy {report.get('classifier_test_accuracy')}), Frechet distance {q.get('frechet_distance')} "
          f"(real vs real {q.get('frechet_distance_real_vs_real')}), precision {q.get('precision')}, recall "
          f"{q.get('recall')} -> {cfg.out}")
    return report


def counts_of(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """(2, K): per intended class, how many predictions agree, and how many there are."""
    return np.stack([np.bincount(labels[pred == labels], minlength=num_classes),
                     np.bincount(labels, minlength=num_classes)])


def agreement_counts(clf, images: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """``counts_of`` for the reference classifier's predictions of ``images``."""
    return counts_of(predict(clf, images)[0], labels, num_classes)


def _label_check(cfg: GenerateConfig, ref: Reference | None, agree: np.ndarray, conditional: bool) -> dict:
    if ref is None:
        return {}
    clf = ref.model

    out: dict = {"classifier": ref.describe(), "reference": REFERENCE_DIR}
    if conditional:  # judged on every candidate the generator drew, before any --filter
        out["agreement"] = round(float(agree[0].sum() / agree[1].sum()), 4)
        out["agreement_per_class"] = [round(float(a / t), 4) for a, t in zip(*agree) if t > 0]
    else:
        out["labels"] = f"pseudo-labels, softmax confidence >= {cfg.min_confidence}"
    if cfg.real_test and split_exists(cfg.real_test):
        test = read_split(cfg.real_test)
        out["classifier_test_accuracy"] = round(accuracy(clf, test.images, test.labels), 4)
    return out


@torch.no_grad()
def features_of(clf, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """The reference classifier's penultimate features of uint8 (N, H, W, C) images, float64."""
    out = [clf.features(to_float01(images[a:a + batch_size])).double().numpy() for a in range(0, len(images), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, clf.feature_dim))


def quality_report(cfg: GenerateConfig, clf, generated: np.ndarray) -> dict:
    """Frechet distance and precision/recall of the generated sample against real test images, in the
    reference classifier's features, beside the same measures between two disjoint real test samples
    of the same size (what an ideal generator would score: the floor set by the sample size)."""
    if not (cfg.real_test and split_exists(cfg.real_test)):
        return {"skipped": "no real test split (--real-test)"}
    test = read_split(cfg.real_test)
    n = min(len(generated), cfg.quality_n, len(test.labels) // 2)
    if n < 10:
        return {"skipped": f"too few images for the measures ({n})"}
    order = np.random.default_rng(cfg.seed).permutation(len(test.labels))  # not a prefix: sources may be class-ordered
    real_a, real_b = (features_of(clf, test.images[np.sort(order[i * n:(i + 1) * n])]) for i in (0, 1))
    fake = features_of(clf, generated[:n])
    stats = {k: gaussian_stats(v) for k, v in (("a", real_a), ("b", real_b), ("fake", fake))}
    pr, floor = precision_recall(real_a, fake), precision_recall(real_a, real_b)
    return {"features": f"the reference classifier's penultimate features ({fake.shape[1]}-d); a Frechet "
                        "distance in them is not Inception FID",
            "n": n, "frechet_distance": round(frechet_distance(*stats["a"], *stats["fake"]), 4),
            "frechet_distance_real_vs_real": round(frechet_distance(*stats["a"], *stats["b"]), 4),
            "precision": pr["precision"], "recall": pr["recall"], "k": pr["k"],
            "precision_real_vs_real": floor["precision"], "recall_real_vs_real": floor["recall"]}


def training_steps(model_dir: str) -> int | None:
    """How many steps the diffusion model trained (a snapshot's step, else its config's steps;
    None for a model this project did not train)."""
    info = Path(model_dir) / "model_info.json"
    try:
        meta = json.loads(info.read_text()) if info.is_file() else {}
    except (OSError, ValueError):
        return None
    steps = meta.get("step", (meta.get("config") or {}).get("steps")) if meta.get("trained") else None
    return steps if isinstance(steps, int) else None


def num_classes_of(split_dir: str) -> int:
    return int(read_fingerprint(split_dir)["num_classes"])


def class_names(cfg: GenerateConfig, num_classes: int) -> list[str]:
    """Class names from the real shards, else the model's model_info.json, else 0..K-1."""
    if split_exists(cfg.real_train):
        names = read_fingerprint(cfg.real_train).get("classes")
        if names and len(names) == num_classes:
            return list(names)
    info = Path(cfg.model) / "model_info.json"
    if info.is_file():
        names = json.loads(info.read_text()).get("classes")
        if names and len(names) == num_classes:
            return list(names)
    return [str(k) for k in range(num_classes)]

"""A standard (non-robust) classifier trained on real images with plain cross-entropy.

Two uses in the ``generate`` stage: pseudo-labels (with a confidence filter) for samples of an
unconditional diffusion model, and the check that samples of a conditional model are labelled as
intended ("agreement": the share of generated images this classifier assigns to the class they
were generated for). It is an instrument, not a result, so it is small and trained briefly:
``pipeline.classifiers.zoo.build_classifier("cnn")``, SGD with Nesterov momentum and a one-cycle LR.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.classifiers.zoo import CONFIG_FILE, MODEL_FILE, build_classifier, load_classifier
from pipeline.core import storage
from pipeline.core.errors import UserError
from pipeline.core.shards import read_split
from pipeline.core.views import to_float01


def train_classifier(images: np.ndarray, labels: np.ndarray, num_classes: int, *, arch: str = "cnn",
                     epochs: int = 2, batch_size: int = 128, lr: float = 0.1, seed: int = 0,
                     nuisance: bool = False, device: str = "cpu", progress: bool = True) -> nn.Module:
    """Train on uint8 (N,H,W,C) images with plain CE; returns the model in eval mode.

    ``nuisance``: also randomise the background level and add pixel noise, so the classifier
    judges shapes rather than the exact black background of real Fashion-MNIST (briefly trained
    diffusion models leave a grey, slightly noisy background; see ``_nuisance``).
    """
    torch.manual_seed(seed)
    x_all, y_all = to_float01(images), torch.from_numpy(labels).long()
    n, (c, h, _) = len(x_all), x_all.shape[1:]
    model = build_classifier(arch, c, num_classes, h).to(device).train()
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
    steps_per_epoch = max(1, n // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    g = torch.Generator().manual_seed(seed)
    bar = tqdm(total=epochs * steps_per_epoch, desc="classifier", mininterval=2, disable=not progress)
    for _ in range(epochs):
        perm = torch.randperm(n, generator=g)
        for s in range(steps_per_epoch):
            idx = perm[s * batch_size:(s + 1) * batch_size]
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            flip = torch.rand(len(idx), generator=g) < 0.5  # horizontal flips: cheap, label-preserving
            x = torch.where(flip.to(device)[:, None, None, None], x.flip(-1), x)
            if nuisance:
                x = _nuisance(x, g)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    bar.close()
    return model.eval()


def _nuisance(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """x -> b + (1 - b) x + noise: background level b ~ U(0, 0.25), noise std ~ U(0, 0.08)."""
    b = torch.rand(len(x), 1, 1, 1, generator=g) * 0.25
    sd = torch.rand(len(x), 1, 1, 1, generator=g) * 0.08
    noise = torch.randn(x.shape, generator=g) * sd
    return (b.to(x.device) + (1 - b.to(x.device)) * x + noise.to(x.device)).clamp(0, 1)


@torch.no_grad()
def predict(model: nn.Module, images: np.ndarray, *, batch_size: int = 500,
            device: str = "cpu") -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels int64, softmax confidence float32) for uint8 (N,H,W,C) images."""
    preds, confs = [], []
    for start in range(0, len(images), batch_size):
        p = F.softmax(model(to_float01(images[start:start + batch_size]).to(device)).float(), dim=1)
        conf, pred = p.max(dim=1)
        preds.append(pred.cpu()), confs.append(conf.cpu())
    if not preds:
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    return torch.cat(preds).numpy().astype(np.int64), torch.cat(confs).numpy().astype(np.float32)


def accuracy(model: nn.Module, images: np.ndarray, labels: np.ndarray, **kw) -> float:
    pred, _ = predict(model, images, **kw)
    return float((pred == labels).mean()) if len(labels) else float("nan")


REFERENCE_DIR = "reference"  # where generate saves its reference classifier (model.safetensors + config.json)


@dataclass(frozen=True)
class Reference:
    """The reference classifier of a generate run and what identifies it: arch, shapes, the data it saw."""

    model: nn.Module
    meta: dict

    def describe(self) -> str:
        seen = self.meta["trained_on"]
        return (f"{self.meta['arch']}, plain CE, {seen['epochs']} epochs on {seen['images']} images of the real train "
                f"split (never the test split; content hash {seen['content_hash'][:12]})"
                + (", background/noise nuisance augmentation" if seen.get("nuisance") else ""))


def fit_reference(split_dir: str, num_classes: int, *, arch: str, epochs: int, limit: int, seed: int,
                  nuisance: bool) -> Reference:
    """Train the reference classifier on the first ``limit`` (0: all) images of a real train split."""
    real = read_split(split_dir, limit=limit, progress=True)
    if int(real.fingerprint["num_classes"]) != num_classes:
        raise UserError(f"{split_dir} has {real.fingerprint['num_classes']} classes, the model {num_classes}")
    model = train_classifier(real.images, real.labels, num_classes, arch=arch, epochs=epochs, seed=seed,
                             nuisance=nuisance)
    h, _, c = real.images.shape[1:]
    return Reference(model, {"arch": arch, "in_channels": int(c), "num_classes": num_classes, "image_size": int(h),
                             "trained_on": {"split": str(split_dir), "content_hash": real.fingerprint["content_hash"],
                                            "images": len(real.labels), "epochs": epochs, "nuisance": nuisance,
                                            "seed": seed}})


def load_reference(folder: str, num_classes: int, image_shape: tuple[int, int]) -> Reference:
    """A reference classifier saved by an earlier generate run (``OUT/reference``), checked against the model."""
    model, meta = load_classifier(folder)
    if "trained_on" not in meta:
        raise UserError(f"{folder}: not a reference classifier saved by generate (no trained_on record)")
    if (meta["num_classes"], meta["image_size"], meta["in_channels"]) != (num_classes, *image_shape):
        raise UserError(f"{folder}: a classifier of {meta['num_classes']} classes for {meta['image_size']} px x "
                        f"{meta['in_channels']} channels; the model makes {num_classes} classes of "
                        f"{image_shape[0]} px x {image_shape[1]}")
    return Reference(model, meta)


def save_reference(ref: Reference, folder: str) -> None:
    """``folder``/model.safetensors + config.json (loadable by ``load_reference``; path or fsspec URL)."""
    from safetensors.torch import save

    tensors = {k: v.detach().cpu().contiguous() for k, v in ref.model.state_dict().items()}
    storage.write_bytes(storage.join(folder, MODEL_FILE), save(tensors))
    storage.write_bytes(storage.join(folder, CONFIG_FILE), (json.dumps(ref.meta, indent=2) + "\n").encode())

"""A standard (non-robust) classifier trained on real images with plain cross-entropy.

Two uses in the ``generate`` stage: pseudo-labels (with a confidence filter) for samples of an
unconditional diffusion model, and the check that samples of a conditional model are labelled as
intended ("agreement": the share of generated images this classifier assigns to the class they
were generated for). It is an instrument, not a result, so it is small and trained briefly:
``pipeline.core.classifiers.build_classifier("cnn")``, SGD with Nesterov momentum and a one-cycle LR.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.core.classifiers import build_classifier
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

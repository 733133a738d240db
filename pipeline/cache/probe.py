"""Linear probe: how much class information a cache's features carry, as one accuracy.

A team receiving a cache can judge it without training anything expensive: multinomial
logistic regression on standardised identity-view features of most of the train part, accuracy
on the train rows it held out (the test set stays unseen: t and layer are chosen by this number). Full-batch L-BFGS on CPU, deterministic (no sampling anywhere).

Extraction stores the probe in the store's root attributes (``probe``) and writes nothing beside
the store; ``export_probe`` (``python -m pipeline cache probe STORE --out FILE``, the DVC stage
``probe``) writes it as a JSON file, e.g. a DVC metric.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.cache.store import open_cache
from pipeline.core.errors import UserError, check_out
from pipeline.core.storage import atomic_write


def linear_probe(train_x: np.ndarray, train_y: np.ndarray, test_x: np.ndarray, test_y: np.ndarray, *,
                 steps: int = 100, weight_decay: float = 1e-4) -> float:
    """Fit on (train_x, train_y), return accuracy on the held-out (test_x, test_y). x: (N, D), y: (N,) ints."""
    xtr = torch.as_tensor(np.asarray(train_x, np.float32))
    xte = torch.as_tensor(np.asarray(test_x, np.float32))
    ytr = torch.as_tensor(np.asarray(train_y, np.int64))
    yte = torch.as_tensor(np.asarray(test_y, np.int64))
    mean, std = xtr.mean(0), xtr.std(0).clamp_min(1e-6)
    xtr, xte = (xtr - mean) / std, (xte - mean) / std
    classes = int(max(ytr.max(), yte.max())) + 1
    w = torch.zeros((xtr.shape[1], classes), requires_grad=True)
    b = torch.zeros(classes, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], lr=1.0, max_iter=steps, line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = F.cross_entropy(xtr @ w + b, ytr) + weight_decay * (w * w).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xte @ w + b).argmax(1) == yte).float().mean())


def _is_probe_file(path: Path) -> bool:
    """A probe JSON this command (or an older extract) wrote: an object with ``sets`` and ``probe_accuracy``."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return isinstance(data, dict) and {"sets", "probe_accuracy"} <= set(data)


def export_probe(store: str, out: str) -> dict:
    """Write the probe a store records (its root attribute, covered by the digest) to the local
    JSON file ``out``: ``{"store", "digest", **probe}``. A file at ``out`` that is not a probe (a
    user's file) is refused, never overwritten."""
    check_out(out, folder=False)
    path = Path(out)
    if (path.exists() or path.is_symlink()) and not _is_probe_file(path):
        raise UserError(f"{out}: exists and is not a probe file; move it or choose another --out")
    cache = open_cache(store)
    probe, diagnostics = cache.meta.probe, cache.meta.diagnostics
    if probe is None or not isinstance(probe.get("sets"), list):
        raise UserError(f"{store}: records no linear probe (extract writes one into every store it finishes)")
    record = {"store": str(store), "digest": cache.digest, **probe}
    if diagnostics is not None:  # the target sets' information figures, beside the probe
        record["diagnostics"] = diagnostics
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(record, indent=2) + "\n")
    return record

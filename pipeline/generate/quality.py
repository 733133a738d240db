"""How good generated images are, measured in a reference classifier's feature space (pure functions).

The reference classifier is trained on the real train split only (``labeller.train_classifier``) and
reads an image into its penultimate features (``classifier.features``: 128 numbers for the ``cnn``).
In that space:

- ``frechet_distance``: the Frechet distance between Gaussians fitted to real test features and to
  generated features, d^2 = |mu_1 - mu_2|^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^(1/2)), the formula of FID
  (Heusel et al. 2017; reference implementation mseitzer/pytorch-fid ``fid_score.py:
  calculate_frechet_distance``). Not Inception FID: the features are this classifier's, so values
  compare generators under one reference classifier, never with published FIDs.
  Tr((S_1 S_2)^(1/2)) is the sum of the square roots of the eigenvalues of S_1^(1/2) S_2 S_1^(1/2)
  (symmetric, so ``eigh`` in float64 suffices where pytorch-fid calls ``scipy.linalg.sqrtm``).
- ``precision_recall``: improved precision and recall (Kynkaanniemi et al. 2019; reference
  implementation kynkaat/improved-precision-and-recall-metric ``precision_recall.py``): each set's
  manifold is the union of balls around its points with radius the distance to the k-th nearest
  other point (k = 3); precision = the share of generated points inside the real manifold
  (fidelity), recall = the share of real points inside the generated manifold (diversity: a filter
  that keeps only easy samples lowers it). A point on a ball's boundary counts as inside, as in the
  reference.
- ``agreement``: the share of generated images the reference classifier assigns to the class they
  were generated for, overall and per class.
"""

from __future__ import annotations

import numpy as np

from pipeline.core.errors import UserError

PR_NEIGHBOURS = 3  # k of the k-NN manifolds (the paper's and the reference code's default)


def _check(name: str, x: np.ndarray, min_rows: int) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    if x.ndim != 2 or len(x) < min_rows:
        raise UserError(f"{name}: need a (N, D) array with N >= {min_rows}, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise UserError(f"{name}: features hold NaN or Inf")
    return x


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean, covariance) of (N, D) features, covariance with N - 1 (numpy's ``np.cov``, as pytorch-fid)."""
    x = _check("features", features, 2)
    return x.mean(axis=0), np.cov(x, rowvar=False)


def _sqrt_psd(s: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((s + s.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(mu1: np.ndarray, s1: np.ndarray, mu2: np.ndarray, s2: np.ndarray) -> float:
    """d^2 between N(mu1, s1) and N(mu2, s2) (the quantity FID reports, in these features)."""
    mu1, mu2, s1, s2 = (np.asarray(a, np.float64) for a in (mu1, mu2, s1, s2))
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (len(mu1), len(mu1)):
        raise UserError(f"frechet_distance: shapes differ ({mu1.shape}, {s1.shape}; {mu2.shape}, {s2.shape})")
    r1 = _sqrt_psd(s1)
    cross = np.linalg.eigvalsh(r1 @ s2 @ r1)
    tr_sqrt = float(np.sqrt(np.clip(cross, 0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * tr_sqrt)
    return max(d, 0.0)  # rounding can leave -1e-12 for identical sets


def _radii(x: np.ndarray, k: int, block: int) -> np.ndarray:
    """Distance from each row of x to its k-th nearest other row."""
    out = np.empty(len(x))
    for a in range(0, len(x), block):
        d = _distances(x[a:a + block], x)
        out[a:a + block] = np.partition(d, k, axis=1)[:, k]  # column 0 of the sorted row is the point itself
    return out


def _distances(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2 * a @ b.T
    return np.sqrt(np.clip(sq, 0, None))


def _coverage(manifold: np.ndarray, radii: np.ndarray, points: np.ndarray, block: int) -> float:
    """Share of ``points`` within distance radii[i] of some manifold[i]."""
    inside = np.zeros(len(points), bool)
    for a in range(0, len(points), block):
        d = _distances(points[a:a + block], manifold)
        inside[a:a + block] = (d <= radii[None, :]).any(axis=1)
    return float(inside.mean())


def precision_recall(real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS, block: int = 1024) -> dict:
    """Improved precision (fake inside the real manifold) and recall (real inside the fake manifold)."""
    real, fake = _check("real features", real, k + 1), _check("generated features", fake, k + 1)
    if real.shape[1] != fake.shape[1]:
        raise UserError(f"precision_recall: {real.shape[1]} vs {fake.shape[1]} feature dimensions")
    return {"precision": round(_coverage(real, _radii(real, k, block), fake, block), 4),
            "recall": round(_coverage(fake, _radii(fake, k, block), real, block), 4), "k": k}


def agreement(pred: np.ndarray, labels: np.ndarray, num_classes: int) -> dict:
    """Overall and per-class share of generated images whose predicted class is their intended one."""
    pred, labels = np.asarray(pred), np.asarray(labels)
    if pred.shape != labels.shape or len(labels) == 0:
        raise UserError(f"agreement: {pred.shape} predictions for {labels.shape} labels")
    hit = np.bincount(labels[pred == labels], minlength=num_classes)
    total = np.bincount(labels, minlength=num_classes)
    return {"agreement": round(float(hit.sum() / total.sum()), 4),
            "agreement_per_class": [round(float(h / t), 4) if t else None for h, t in zip(hit, total)]}

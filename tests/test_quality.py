"""Generator-quality measures (pipeline/generate/quality.py) against closed forms and brute force."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.core.errors import UserError
from pipeline.generate.quality import agreement, frechet_distance, gaussian_stats, precision_recall


def test_frechet_distance_matches_the_closed_form_of_commuting_gaussians():
    """For diagonal covariances d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2; a rotation of both
    Gaussians (the same orthogonal Q) leaves it unchanged, so the eigen route is checked off-diagonal too."""
    rng = np.random.default_rng(0)
    a, b = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    want = ((mu1 - mu2) ** 2).sum() + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(want, rel=1e-10)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    got = frechet_distance(q @ mu1, q @ np.diag(a) @ q.T, q @ mu2, q @ np.diag(b) @ q.T)
    assert got == pytest.approx(want, rel=1e-8)
    # symmetric in its two arguments, 0 for one Gaussian with itself
    s1, s2 = q @ np.diag(a) @ q.T, np.cov(rng.normal(size=(50, 6)), rowvar=False)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(frechet_distance(mu2, s2, mu1, s1), rel=1e-8)
    assert frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9)


def test_gaussian_stats_are_numpys_mean_and_unbiased_covariance():
    x = np.random.default_rng(1).normal(size=(40, 3))
    mu, s = gaussian_stats(x)
    assert np.allclose(mu, x.mean(0)) and np.allclose(s, (x - mu).T @ (x - mu) / 39)


def _brute_pr(real, fake, k):
    """Kynkaanniemi et al.'s definition written out point by point."""
    def radius(x, i):
        return np.sort(np.linalg.norm(x - x[i], axis=1))[k]  # index 0 is the point itself

    def inside(p, x):
        return any(np.linalg.norm(p - x[i]) <= radius(x, i) for i in range(len(x)))

    return (np.mean([inside(p, real) for p in fake]), np.mean([inside(p, fake) for p in real]))


def test_precision_recall_equals_the_definition_and_sees_lost_diversity():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(60, 4))
    fake = rng.normal(size=(50, 4)) * 0.5 + 0.3
    got = precision_recall(real, fake, block=7)  # blocks smaller than the sets: the blocking is exact
    p, r = _brute_pr(real, fake, 3)
    assert (got["precision"], got["recall"]) == (round(p, 4), round(r, 4))
    same = precision_recall(real, real.copy())
    assert same["precision"] == same["recall"] == 1.0
    # a "filter" that keeps only one tight cluster: precision stays high, recall collapses
    collapsed = real[:1] + rng.normal(size=(40, 4)) * 0.01
    pr = precision_recall(real, collapsed)
    assert pr["precision"] == 1.0 and pr["recall"] < 0.2
    far = precision_recall(real, real + 100)
    assert far["precision"] == far["recall"] == 0.0


def test_agreement_overall_and_per_class():
    got = agreement(np.array([0, 1, 1, 2, 0, 2]), np.array([0, 1, 2, 2, 1, 2]), 4)
    assert got == {"agreement": round(4 / 6, 4), "agreement_per_class": [1.0, 0.5, round(2 / 3, 4), None]}


@pytest.mark.parametrize("bad", [np.full((5, 3), np.nan), np.zeros((2, 3)), np.zeros(5)])
def test_bad_features_are_refused(bad):
    with pytest.raises(UserError):
        precision_recall(bad, np.random.default_rng(0).normal(size=(10, 3)))

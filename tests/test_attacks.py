"""PGD: stays in the threat model, hurts a trained model, and is pure (mode, BN stats, grads)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.classifiers.zoo import build_classifier
from pipeline.core.attacks import pgd
from pipeline.core.shards import read_split


@pytest.fixture(scope="module")
def trained(fmnist_shards):
    """A cnn trained for a few clean steps on 512 real Fashion-MNIST images, plus a batch."""
    s = read_split(fmnist_shards / "train")
    x = torch.from_numpy(s.images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(s.labels)
    torch.manual_seed(0)
    m = build_classifier("cnn", 1, 10, 28)
    opt = torch.optim.Adam(m.parameters(), lr=3e-3)
    for i in range(60):
        idx = torch.arange(i * 64, (i + 1) * 64) % len(y)
        opt.zero_grad()
        F.cross_entropy(m(x[idx]), y[idx]).backward()
        opt.step()
    return m, x[:128], y[:128]


def test_in_ball_and_range(trained):
    m, x, y = trained
    xa = pgd(m, x, y, eps=0.1, alpha=0.03, steps=5)
    assert (xa - x).abs().max() <= 0.1 + 1e-6
    assert xa.min() >= 0 and xa.max() <= 1


def test_attack_hurts(trained):
    m, x, y = trained
    m.eval()
    clean = (m(x).argmax(1) == y).float().mean()
    xa = pgd(m, x, y, eps=0.1, alpha=0.03, steps=10)
    adv = (m(xa).argmax(1) == y).float().mean()
    assert clean > 0.4 and adv < clean - 0.3, (clean, adv)
    assert F.cross_entropy(m(xa), y) > F.cross_entropy(m(x), y)


def test_one_step_equals_fgsm_reference(trained):
    """steps=1, no random start, alpha=eps is FGSM: x + eps * sign(grad), clipped to [0,1]."""
    m, x, y = trained
    m.eval()
    xr = x.clone().requires_grad_(True)
    F.cross_entropy(m(xr), y, reduction="sum").backward()
    ref = (x + 0.1 * xr.grad.sign()).clamp(0, 1)
    out = pgd(m, x, y, eps=0.1, alpha=0.1, steps=1, random_start=False)
    assert torch.allclose(out, ref, atol=1e-6)


def test_pure(trained):
    m, x, y = trained
    m.train()
    m.body[0].eval()  # a mixed-mode model: each submodule's mode must come back as it was
    stats = {k: v.clone() for k, v in m.state_dict().items()}
    for p in m.parameters():
        p.grad = None
    for loss in ("ce", "kl"):
        pgd(m, x, y, eps=0.1, alpha=0.03, steps=3, loss=loss, restarts=2)
    assert m.training and not m.body[0].training and m.body[1].training
    assert all(p.grad is None for p in m.parameters())
    for k, v in m.state_dict().items():
        assert torch.equal(v, stats[k]), k


def test_seeded_and_restarts(trained):
    m, x, y = trained
    a = pgd(m, x, y, eps=0.1, alpha=0.03, steps=2, generator=torch.Generator().manual_seed(1))
    b = pgd(m, x, y, eps=0.1, alpha=0.03, steps=2, generator=torch.Generator().manual_seed(1))
    c = pgd(m, x, y, eps=0.1, alpha=0.03, steps=2, generator=torch.Generator().manual_seed(2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    m.eval()
    single = F.cross_entropy(m(a), y, reduction="none")
    multi = pgd(m, x, y, eps=0.1, alpha=0.03, steps=2, restarts=3, generator=torch.Generator().manual_seed(1))
    # the first restart is `a`, so the kept restart can only be at least as strong per sample
    assert (F.cross_entropy(m(multi), y, reduction="none") >= single - 1e-5).all()


def test_kl_attack_moves_prediction(trained):
    m, x, y = trained
    m.eval()
    xa = pgd(m, x, y, eps=0.1, alpha=0.03, steps=5, loss="kl")
    kl = F.kl_div(F.log_softmax(m(xa), 1), F.softmax(m(x), 1), reduction="batchmean")
    assert kl > 0.05
    with pytest.raises(ValueError):
        pgd(m, x, y, eps=0.1, alpha=0.03, steps=1, loss="cw")

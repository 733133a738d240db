"""Losses against hand-written references (plain formulas, no torch.nn.functional shortcuts)."""

from __future__ import annotations

import torch

from pipeline.losses import dra_loss, pgd_at_loss, trades_loss


def _log_softmax(z):
    return z - z.exp().sum(1, keepdim=True).log()


def _ce_ref(z, y, smooth):
    logp = _log_softmax(z)
    k = z.shape[1]
    q = torch.full_like(logp, smooth / k)
    q[torch.arange(len(y)), y] += 1 - smooth
    return -(q * logp).sum(1).mean()


def test_pgd_at_loss_matches_reference():
    g = torch.Generator().manual_seed(0)
    z, y = torch.randn(16, 10, generator=g), torch.randint(0, 10, (16,), generator=g)
    for smooth in (0.0, 0.1):
        got = pgd_at_loss(z, y, label_smoothing=smooth)
        assert set(got) == {"ce"}
        assert torch.allclose(got["ce"], _ce_ref(z, y, smooth), atol=1e-6)


def test_trades_terms_match_reference():
    g = torch.Generator().manual_seed(1)
    zc, za = torch.randn(8, 10, generator=g), torch.randn(8, 10, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    got = trades_loss(zc, za, y)
    p, logp, logq = _log_softmax(zc).exp(), _log_softmax(zc), _log_softmax(za)
    kl = (p * (logp - logq)).sum() / 8
    assert torch.allclose(got["kl"], kl, atol=1e-6)
    assert torch.allclose(got["ce"], _ce_ref(zc, y, 0.0), atol=1e-6)
    assert trades_loss(zc, zc, y)["kl"].abs() < 1e-6


def test_dra_loss_reference_and_gradient():
    g = torch.Generator().manual_seed(2)
    pred = torch.randn(5, 7, generator=g, requires_grad=True)
    tgt = torch.randn(5, 7, generator=g).half()
    got = dra_loss(pred, tgt)["dra"]
    t = tgt.float()
    cos = (pred * t).sum(1) / (pred.norm(dim=1) * t.norm(dim=1))
    assert torch.allclose(got, (1 - cos).mean(), atol=1e-6)
    got.backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    assert dra_loss(t, t * 3)["dra"].abs() < 1e-6  # scale-invariant: aligned vectors cost 0
    assert torch.allclose(dra_loss(t, -t)["dra"], torch.tensor(2.0))

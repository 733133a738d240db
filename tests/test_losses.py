"""Losses against hand-written references (plain formulas, no torch.nn.functional shortcuts)."""

from __future__ import annotations

import pytest
import torch

from pipeline.train.losses import dra_loss, pgd_at_loss, trades_loss


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


def test_trades_step_equals_two_separate_forwards():
    """TRADES as the reference (yaodongyu/TRADES trades.py): the clean and the adversarial batch are
    normalised with their own BatchNorm statistics. Our one concatenated forward (one module call,
    for DDP) must give the loss, the gradients and the running statistics of two forwards."""
    import copy

    from pipeline.classifiers.zoo import build_classifier
    from pipeline.core.attacks import pgd
    from pipeline.train.config import Method
    from pipeline.train.model import DRANet
    from pipeline.train.step import StepSettings, adversarial_step

    torch.manual_seed(0)
    model = build_classifier("cnn", 1, 10, 28)
    g = torch.Generator().manual_seed(3)
    x, y = torch.rand(16, 1, 28, 28, generator=g), torch.randint(0, 10, (16,), generator=g)
    s = StepSettings(Method.trades, eps=0.1, alpha=0.03, steps=3, beta=6.0, label_smoothing=0.0)

    ref = copy.deepcopy(model)
    x_adv = pgd(ref, x, y, eps=s.eps, alpha=s.alpha, steps=s.steps, loss="kl",
                generator=torch.Generator().manual_seed(7))
    ref.train()
    logits_clean, logits_adv = ref(x), ref(x_adv)  # two forwards, two BN batches
    want = trades_loss(logits_clean, logits_adv, y)
    want_total = want["ce"] + s.beta * want["kl"]
    want_total.backward()

    model.train()
    total, terms, _ = adversarial_step(DRANet(model, None), model, x, y, None, 0.0, s,
                                       torch.Generator().manual_seed(7))
    total.backward()
    assert torch.allclose(total, want_total, atol=1e-5)
    for name, p in model.named_parameters():
        assert torch.allclose(p.grad, dict(ref.named_parameters())[name].grad, atol=1e-5), name
    for name, b in model.named_buffers():  # running stats: updated once per half, clean first
        assert torch.allclose(b.float(), dict(ref.named_buffers())[name].float(), atol=1e-6), name
    assert not any("forward" in vars(m) for m in model.modules())  # the plain BN forward is back
    # what one shared BN batch gives instead: a different loss (so this test can fail)
    shared = copy.deepcopy(ref)
    lc, la = shared(torch.cat([x, x_adv])).chunk(2)
    shared_terms = trades_loss(lc, la, y)
    assert abs(float((shared_terms["ce"] + s.beta * shared_terms["kl"] - want_total).detach())) > 1e-3


def test_pca_whitening_gives_every_principal_direction_unit_variance():
    """--target-norm pca: a near-scalar target (one direction holds ~99% of the variance) comes out
    with identity covariance, so its other directions count in the cosine; a grid target is whitened
    over its channels at every location; the map is the direct formula (centre, then x @ W)."""
    import numpy as np

    from pipeline.train.config import TargetNorm
    from pipeline.train.step import normalise_targets, pca_whitening

    rng = np.random.default_rng(0)
    mix, _ = np.linalg.qr(rng.normal(size=(8, 8)))  # a rotation: the spectrum is the one written below
    x = (rng.normal(size=(20000, 8)) * np.array([30, 1, 1, 1, 0.5, 0.5, 0.2, 0.2])) @ mix + 3.0
    mean = x.mean(axis=0)
    w = pca_whitening(x, mean)
    out = normalise_targets(torch.from_numpy(x).float(), torch.from_numpy(mean).float(), torch.ones(8), TargetNorm.pca, w)
    cov = np.cov(out.numpy().T)
    np.testing.assert_allclose(cov, np.eye(8), atol=5e-3)
    torch.testing.assert_close(out, (torch.from_numpy(x - mean).float()) @ w, rtol=1e-4, atol=1e-4)  # fp32 order
    grid = rng.normal(size=(500, 4, 3, 3)) * np.array([10, 1, 1, 0.1])[None, :, None, None]
    gw = pca_whitening(grid, np.zeros((4, 3, 3)))
    g = normalise_targets(torch.from_numpy(grid).float(), torch.zeros(4, 3, 3), torch.ones(4, 3, 3), TargetNorm.pca, gw)
    per_location = g.permute(0, 2, 3, 1).reshape(-1, 4).numpy()
    np.testing.assert_allclose(np.cov(per_location.T), np.eye(4), atol=0.05)
    with pytest.raises(ValueError, match="whitening"):
        normalise_targets(torch.zeros(2, 8), torch.zeros(8), torch.ones(8), TargetNorm.pca)


def test_a_run_with_pca_targets_trains_and_its_loader_matches(store, tmp_path):
    from reliability_helpers import train_cfg

    from pipeline import api
    from pipeline.train import trainer
    from pipeline.train.config import TargetNorm

    tr = trainer.Trainer.create(train_cfg(store, tmp_path / "pca", target_norm=TargetNorm.pca))
    assert tr.data.whitening is not None and tr.data.whitening.shape == (tr.data.target.channels,) * 2
    ds = api.CacheDataset(str(store), target_norm="pca", limit=tr.cfg.real_limit)  # the same rows and views drawn
    torch.testing.assert_close(ds.whitening, tr.data.whitening.cpu())
    feed = tr.feed(0, 0)
    try:
        batch, inputs = next(iter(feed))
    finally:
        feed.close()
    stats, _, _ = tr.step(0, batch, inputs)
    assert torch.isfinite(stats["loss"]) and torch.isfinite(stats["dra"])

"""Losses against hand-written references (plain formulas, no torch.nn.functional shortcuts)."""

from __future__ import annotations

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

    from pipeline.core.attacks import pgd
    from pipeline.core.classifiers import build_classifier
    from pipeline.train.config import Method
    from pipeline.train.step import DRANet, StepSettings, adversarial_step

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

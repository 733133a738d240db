"""DRA where REPA aligns: grid targets compared per location (against REPA's loss written out),
heads on a classifier block's map (``--align-layer``), the aligned input (``--align-input``), the
DRA term's share of the backbone gradient, and a grid target set extracted, stored and trained on."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch
import torch.nn.functional as F
from reliability_helpers import extract_cfg, train_cfg

from pipeline.cache.targets import Pooling, TargetSpec, reduce
from pipeline.classifiers.zoo import build_classifier, feature_blocks
from pipeline.core.errors import UserError
from pipeline.train.config import AlignInput, Method
from pipeline.train.losses import dra_loss
from pipeline.train.model import DRANet, MapHead, ProjectionHead, backbone_parameters, build_dra_net
from pipeline.train.step import StepSettings, adversarial_step, dra_grad_share

GRID = TargetSpec(100, "mid_block", Pooling.grid4, (6, 4, 4))


def _repa_proj_loss(z: torch.Tensor, z_tilde: torch.Tensor) -> torch.Tensor:
    """sihyun-yu/REPA loss.py (SILoss.__call__), one encoder: tokens (B, T, D); per sample the mean
    over tokens of -<normalize(z_j), normalize(z_tilde_j)>, summed over the batch and divided by it."""
    loss = torch.zeros(())
    for z_j, z_tilde_j in zip(z, z_tilde):
        z_tilde_j = F.normalize(z_tilde_j, dim=-1)
        z_j = F.normalize(z_j, dim=-1)
        loss = loss + (-(z_j * z_tilde_j).sum(dim=-1)).mean()
    return loss / len(z)


def test_grid_loss_is_repas_per_location_cosine():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(5, 6, 4, 4, generator=g), torch.randn(5, 6, 4, 4, generator=g)
    got = dra_loss(pred, target)["dra"]
    # REPA's tokens: (B, C, G, G) -> (B, G*G, C)
    tokens = lambda x: x.flatten(2).transpose(1, 2)  # noqa: E731
    torch.testing.assert_close(got, 1 + _repa_proj_loss(tokens(target), tokens(pred)), rtol=0, atol=1e-6)
    # and an explicit loop / einsum over locations
    pn, tn = pred / pred.norm(dim=1, keepdim=True), target / target.norm(dim=1, keepdim=True)
    cos = torch.einsum("bchw,bchw->bhw", pn, tn)
    torch.testing.assert_close(got, (1 - cos).mean(), rtol=0, atol=1e-6)
    loop = sum(1 - float(pn[b, :, i, j] @ tn[b, :, i, j]) for b in range(5) for i in range(4) for j in range(4))
    assert abs(float(got) - loop / 80) < 1e-5
    # flatten: ONE cosine over the whole map per sample, which is another number
    one = dra_loss(pred.flatten(1), target.flatten(1))["dra"]
    torch.testing.assert_close(one, (1 - F.cosine_similarity(pred.flatten(1), target.flatten(1))).mean())
    assert abs(float(one) - float(got)) > 1e-3
    # the gradient reaches every location
    p = pred.clone().requires_grad_(True)
    dra_loss(p, target)["dra"].backward()
    assert (p.grad.flatten(2).abs().sum(1) > 0).all()


def test_grid_pooling_and_its_spec():
    h = torch.randn(2, 6, 14, 14)
    torch.testing.assert_close(reduce(Pooling.grid4, h), F.adaptive_avg_pool2d(h, 4))
    torch.testing.assert_close(reduce(Pooling.grid7, h), h.reshape(2, 6, 7, 2, 7, 2).mean(dim=(3, 5)))
    assert GRID.grid == 4 and GRID.channels == 6 and GRID.size == 96
    assert TargetSpec(1, "x", Pooling.mean, (8,)).grid is None and TargetSpec(1, "x", Pooling.mean, (8,)).channels == 8
    assert TargetSpec.from_attrs(GRID.to_attrs()) == GRID
    with pytest.raises(UserError, match="malformed target"):
        TargetSpec.from_attrs({**GRID.to_attrs(), "shape": [6, 3, 3]})
    with pytest.raises(ValueError, match="feature map"):
        reduce(Pooling.grid4, torch.randn(2, 6))


def test_classifier_blocks_and_the_map_head():
    clf = build_classifier("cnn", 1, 10, 28)
    blocks = feature_blocks(clf, 1, 28)
    assert blocks == {"body.0": (16, 28, 28), "body.1": (32, 14, 14), "body.2": (64, 7, 7)}
    assert list(feature_blocks(build_classifier("resnet", 1, 10, 28), 1, 28))[0] == "stem"  # not its BN/ReLU
    torch.manual_seed(0)
    head = MapHead(32, 8, 6, 4)
    m = torch.randn(3, 32, 14, 14)
    out = head(m)
    assert out.shape == (3, 6, 4, 4)
    # per location: the same MLP on the adaptively pooled map's C-vector at that location
    pooled = F.adaptive_avg_pool2d(m, 4)
    mlp = [head.net[i] for i in (0, 2, 4)]
    v = pooled[1, :, 2, 3]
    for i, conv in enumerate(mlp):
        v = conv.weight[:, :, 0, 0] @ v + conv.bias
        v = F.silu(v) if i < 2 else v
    torch.testing.assert_close(out[1, :, 2, 3], v, rtol=0, atol=1e-5)
    assert MapHead(32, 8, 6, None)(m).shape == (3, 6)


def test_dra_net_reads_the_named_block():
    torch.manual_seed(0)
    clf = build_classifier("cnn", 1, 10, 28)
    net = build_dra_net(clf, GRID, 8, "body.1", in_channels=1, image_size=28)
    assert isinstance(net.head, MapHead) and net.head.net[0].in_channels == 32
    x = torch.rand(4, 1, 28, 28)
    net.eval()
    logits, pred = net(x)
    torch.testing.assert_close(logits, clf(x))
    kept = clf.body[1](clf.body[0](x * 2 - 1))
    torch.testing.assert_close(pred, net.head(kept))
    assert not clf.body[1]._forward_hooks  # the hook lived only for the call
    # DRA reaches the blocks up to the aligned one, not after it
    net.train()
    dra_loss(net(x)[1], torch.randn(4, 6, 4, 4))["dra"].backward()
    assert clf.body[0][0].weight.grad.abs().sum() > 0 and clf.body[2][0].weight.grad is None
    # default: the final pooled features, a ProjectionHead whose output takes a grid target's shape
    torch.manual_seed(0)
    plain = build_dra_net(build_classifier("cnn", 1, 10, 28), GRID, 8, in_channels=1, image_size=28)
    assert isinstance(plain.head, ProjectionHead) and plain(x)[1].shape == (4, 6, 4, 4)
    assert set(plain.head.state_dict()) == {f"net.{i}.{p}" for i in (0, 2, 4) for p in ("weight", "bias")}
    with pytest.raises(UserError, match=r"'fc' is not a block of the cnn classifier; .*body.1 32x14x14"):
        build_dra_net(build_classifier("cnn", 1, 10, 28), GRID, 8, "fc", in_channels=1, image_size=28)


def _step(net, x, y, target, s, seed=0, dra_w=1.0, share=None):
    gen = torch.Generator().manual_seed(seed)
    return adversarial_step(net, net.classifier, x, y, target, dra_w, s, gen, share)


@pytest.mark.parametrize("method", [Method.pgd, Method.trades])
def test_clean_alignment_does_not_depend_on_the_attack(method):
    torch.manual_seed(1)
    net = build_dra_net(build_classifier("cnn", 1, 10, 28), GRID, 8, "body.1", in_channels=1, image_size=28).train()
    x, y, target = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.randn(8, 96)
    s = StepSettings(method, 0.3, 0.1, 2, 6.0, 0.0)
    runs, start = {}, {k: v.clone() for k, v in net.state_dict().items()}
    for align in AlignInput:
        for eps, seed in ((0.0, 0), (0.3, 0), (0.3, 5)):
            net.load_state_dict(start)  # the attack runs in eval mode: the same running statistics each time
            _, terms, _ = _step(net, x, y, target, replace(s, eps=eps, align=align), seed)
            runs[align, eps, seed] = terms
    clean = [runs[AlignInput.clean, e, sd]["dra"] for e, sd in ((0.0, 0), (0.3, 0), (0.3, 5))]
    assert torch.equal(clean[0], clean[1]) and torch.equal(clean[1], clean[2])
    adv = [runs[AlignInput.adv, e, sd]["dra"] for e, sd in ((0.0, 0), (0.3, 0), (0.3, 5))]
    assert not torch.equal(adv[0], adv[1]) and not torch.equal(adv[1], adv[2])
    # eps = 0: the adversarial input is the clean one
    torch.testing.assert_close(adv[0], clean[0])
    both = runs[AlignInput.both, 0.3, 5]
    torch.testing.assert_close(both["dra"], (both["dra_adv"] + both["dra_clean"]) / 2)
    torch.testing.assert_close(both["dra_adv"], adv[2])
    torch.testing.assert_close(both["dra_clean"], clean[2])
    # the AT part is the same whatever the aligned input
    for key in ("ce", "kl") if method is Method.trades else ("ce",):
        torch.testing.assert_close(runs[AlignInput.clean, 0.3, 5][key], runs[AlignInput.adv, 0.3, 5][key])


def test_clean_alignment_leaves_the_at_step_and_batch_statistics_as_with_adv():
    """PGD-AT + clean alignment: the clean view is normalised with its own statistics and does not
    update the running ones, so BatchNorm state after a step equals the adv-aligned step's."""
    x, y, target = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.randn(8, 96)
    states, logits = [], []
    for align in (AlignInput.adv, AlignInput.clean):
        torch.manual_seed(2)
        net = build_dra_net(build_classifier("cnn", 1, 10, 28), GRID, 8, in_channels=1, image_size=28).train()
        _, _, lg = _step(net, x, y, target, StepSettings(Method.pgd, 0.1, 0.05, 2, 6.0, 0.0, align), seed=3)
        states.append({k: v.clone() for k, v in net.classifier.state_dict().items()})
        logits.append(lg)
    torch.testing.assert_close(logits[0], logits[1])
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key


def test_grad_share_is_the_norm_ratio_and_changes_nothing():
    x, y, target = torch.rand(8, 1, 28, 28), torch.randint(0, 10, (8,)), torch.randn(8, 96)
    s = StepSettings(Method.pgd, 0.1, 0.05, 2, 6.0, 0.0)
    grads = []
    for measure in (False, True):
        torch.manual_seed(4)
        net = build_dra_net(build_classifier("cnn", 1, 10, 28), GRID, 8, "body.1", in_channels=1,
                            image_size=28).train()
        params = backbone_parameters(net.classifier)
        assert all(p is not net.classifier.fc.weight for p in params)
        total, terms, _ = _step(net, x, y, target, s, seed=6, dra_w=0.5, share=params if measure else None)
        assert ("dra_grad_share" in terms) is measure
        total.backward()
        grads.append([p.grad.clone() for p in params])
    for a, b in zip(*grads):
        assert torch.equal(a, b)  # the measurement leaves the update as it was
    # by hand: the two gradients on fresh graphs of the same step
    torch.manual_seed(4)
    net = build_dra_net(build_classifier("cnn", 1, 10, 28), GRID, 8, "body.1", in_channels=1, image_size=28).train()
    params = backbone_parameters(net.classifier)
    total, terms, _ = _step(net, x, y, target, s, seed=6, dra_w=0.5)
    g_all = torch.autograd.grad(total, params, retain_graph=True)
    g_dra = torch.autograd.grad(0.5 * terms["dra"], params, allow_unused=True)
    norm = lambda gs: torch.sqrt(sum((g ** 2).sum() for g in gs if g is not None))  # noqa: E731
    want = norm(g_dra) / norm(g_all)
    torch.manual_seed(4)
    net = build_dra_net(build_classifier("cnn", 1, 10, 28), GRID, 8, "body.1", in_channels=1, image_size=28).train()
    _, terms, _ = _step(net, x, y, target, s, seed=6, dra_w=0.5, share=backbone_parameters(net.classifier))
    torch.testing.assert_close(terms["dra_grad_share"], want)
    assert 0 < float(want) < 1
    # lambda = 0: no share
    zero = torch.tensor(0.0, requires_grad=True)
    assert float(dra_grad_share(zero * 2 + params[0].sum(), zero * 0, params)) == 0.0


def test_no_head_without_a_target():
    net = build_dra_net(build_classifier("cnn", 1, 10, 28), None, 8, "body.1", in_channels=1, image_size=28)
    assert net.head is None and net.align_layer == ""
    assert isinstance(net, DRANet) and net(torch.rand(2, 1, 28, 28))[1] is None


def test_a_grid_target_set_extracts_stores_and_trains_per_location(tiny_model_dir, fmnist_shards, tmp_path):
    from pipeline.cache.store import open_cache, verify_cache
    from stages import extract, train

    store = tmp_path / "grid.zarr"
    extract.run(extract_cfg(tiny_model_dir, fmnist_shards, store, pooling=Pooling.grid4,
                            layer="mid_block,up_blocks.0"))
    assert verify_cache(str(store)) == []
    cache = open_cache(str(store))
    assert [(s.name, s.pooling, s.shape) for s in cache.targets] == [
        ("t100-mid_block", Pooling.grid4, (16, 4, 4)), ("t100-up_blocks.0", Pooling.grid4, (16, 4, 4))]
    part = cache.part("train")
    assert part.read([0, 1], [0, 1]).shape == (2, 16, 4, 4) and part.mean.shape == (16, 4, 4)
    probe = cache.attrs["probe"]["sets"]
    assert len(probe) == 2 and all(0 <= s["probe_accuracy"] <= 1 for s in probe)

    out = tmp_path / "run"
    metrics = train.run(train_cfg(store, out, align_layer="body.1", dra_grad_every=1, max_steps=2))
    log = (out / "log.tsv").read_text().splitlines()
    header = log[0].split("\t")
    assert "dra" in header and "dra_grad_share" in header
    share = float(log[1].split("\t")[header.index("dra_grad_share")])
    assert 0 < share < 1 and metrics["dra_grad_share"] == share
    assert json.loads((out / "metrics.json").read_text())["dra_grad_share"] == share
    config = json.loads((out / "config.json").read_text())
    assert config["train"]["align_layer"] == "body.1" and config["cache"]["target_set"] == "t100-mid_block"
    from safetensors import safe_open

    with safe_open(str(out / "state.safetensors"), framework="pt") as fh:
        assert fh.get_tensor("net.head.net.4.weight").shape == (16, 16, 1, 1)  # C_target x hidden, per location
    # the clean input, and the up_blocks.0 set from the default pooled features
    train.run(train_cfg(store, tmp_path / "clean", align_input=AlignInput.clean, layer="up_blocks.0", max_steps=2))
    with pytest.raises(UserError, match="not a block of the cnn classifier"):
        train.run(train_cfg(store, tmp_path / "bad", align_layer="body.9", max_steps=1))


def test_measuring_the_share_leaves_training_unchanged(store, tmp_path):
    """The default cache (mean pooling), default head: the same weights with or without the measurement."""
    from safetensors.torch import load_file

    from stages import train

    runs = {}
    for every in (0, 1):
        out = tmp_path / f"every{every}"
        metrics = train.run(train_cfg(store, out, dra_grad_every=every))
        runs[every] = load_file(str(out / "model.safetensors")), metrics
    assert "dra_grad_share" not in runs[0][1] and 0 < runs[1][1]["dra_grad_share"] < 1
    for key, value in runs[0][0].items():
        assert torch.equal(value, runs[1][0][key]), key
    assert runs[0][1]["loss"] == runs[1][1]["loss"]

"""views: the batched transform equals the plain numpy definition, view 0 is the identity."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.views import ViewSpec, all_views, apply_view_reference, apply_views, sample_views


def test_batched_views_equal_reference(fmnist_shards):
    from pipeline.core.shards import read_split

    images = read_split(fmnist_shards / "train").images[:64]
    spec = ViewSpec(pad=3, flip=True)
    v = sample_views(64, 5, spec, seed=1)
    for k in range(5):
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
        got = apply_views(x, torch.from_numpy(v["dx"][:, k]), torch.from_numpy(v["dy"][:, k]),
                          torch.from_numpy(v["flip"][:, k]), spec.pad)
        for i in range(64):
            ref = apply_view_reference(images[i], v["dx"][i, k], v["dy"][i, k], v["flip"][i, k], spec.pad)
            np.testing.assert_array_equal(got[i].permute(1, 2, 0).numpy(), ref.astype(np.float32))


def test_view_zero_is_identity_and_draws_are_seeded():
    spec = ViewSpec(pad=2, flip=True)
    a, b = sample_views(100, 4, spec, seed=7), sample_views(100, 4, spec, seed=7)
    for name in ("dx", "dy", "flip"):
        np.testing.assert_array_equal(a[name], b[name])
    assert (a["dx"][:, 0] == 2).all() and (a["dy"][:, 0] == 2).all() and (a["flip"][:, 0] == 0).all()
    assert a["dx"].min() >= 0 and a["dx"].max() <= 4 and a["flip"][:, 1:].any()
    x = torch.rand(100, 1, 28, 28)
    same = apply_views(x, torch.from_numpy(a["dx"][:, 0]), torch.from_numpy(a["dy"][:, 0]),
                       torch.from_numpy(a["flip"][:, 0]), 2)
    assert torch.equal(same, x)
    assert (sample_views(10, 3, ViewSpec(pad=2, flip=False), 0)["flip"] == 0).all()


def test_all_views_enumerate_the_view_space_once_identity_first():
    from pipeline.core.views import ViewSpec, all_views

    for spec, count in ((ViewSpec(pad=2), 50), (ViewSpec(pad=4), 162), (ViewSpec(pad=2, flip=False), 25),
                        (ViewSpec(pad=0), 2)):
        v = all_views(3, spec)
        assert spec.n_views == count and v["dx"].shape == (3, count)
        combos = list(zip(v["dx"][1], v["dy"][1], v["flip"][1]))
        assert len(set(combos)) == count and combos[0] == (spec.pad, spec.pad, 0)
        assert all((v[key][0] == v[key][2]).all() for key in ("dx", "dy", "flip"))  # one order for every row


def test_training_draws_under_all_views_follow_the_standard_augmentation():
    """The sampler draws view indices uniformly among K recorded views; with K = every view, the
    (dx, dy, flip) it serves is uniform over the view space, as random crop + flip is: counted
    over 40 epochs of 200 samples (8000 draws, 160 per view expected), every view appears and
    each count is within 5 standard deviations; so is the flip rate and each offset's marginal."""
    import numpy as np

    from pipeline.core.views import ViewSpec, all_views
    from pipeline.train.sampler import MixedSampler

    spec, n = ViewSpec(pad=2), 200
    v = all_views(n, spec)
    sampler = MixedSampler(n_real=n, k_real=spec.n_views, batch_size=50, seed=3)
    counts = np.zeros((5, 5, 2), np.int64)
    for epoch in range(40):
        for b in sampler.batches(epoch):
            np.add.at(counts, (v["dx"][b.real_rows, b.real_views], v["dy"][b.real_rows, b.real_views],
                               v["flip"][b.real_rows, b.real_views]), 1)
    total = counts.sum()
    expected = total / 50
    assert total == 8000 and counts.min() > 0
    assert np.abs(counts - expected).max() < 5 * np.sqrt(expected)
    assert abs(counts[..., 1].sum() / total - 0.5) < 5 * np.sqrt(0.25 / total)
    for axis in ((1, 2), (0, 2)):  # dx and dy marginals: uniform over 0..4
        assert np.abs(counts.sum(axis=axis) - total / 5).max() < 5 * np.sqrt(total / 5)


def test_fresh_views_are_the_standard_draw_and_only_for_plain_at():
    import numpy as np
    import pytest

    from pipeline.core.errors import UserError
    from pipeline.core.views import ViewSpec, fresh_views
    from pipeline.train.config import TrainConfig

    dx, dy, flip = fresh_views(20000, ViewSpec(pad=2), np.random.default_rng(0))
    assert set(dx.tolist()) == set(dy.tolist()) == set(range(5)) and set(flip.tolist()) == {0, 1}
    assert abs(float(flip.float().mean()) - 0.5) < 0.02
    again = fresh_views(20000, ViewSpec(pad=2), np.random.default_rng(0))
    assert all((a == b).all() for a, b in zip((dx, dy, flip), again))  # seeded: a resume draws the same
    TrainConfig(fresh_views=True, dra_weight=0.0).validate()
    with pytest.raises(UserError, match="--fresh-views"):
        TrainConfig(fresh_views=True, dra_weight=0.5).validate()


def test_uniform_views_have_no_forced_identity():
    """identity_first=False: K distinct views per sample, uniform over the view space. Counted over
    20000 samples x 4 views (pad 2: 50 views, 1600 draws each expected): the identity's share is
    ~1/50 (not the 1/4 + 3/4 * 1/50 of a forced view 0), in every slot too, and the 50 counts pass a
    chi-square test (Wilson-Hilferty bound at z = 4, ~3e-5 one-sided)."""
    spec, n, k = ViewSpec(pad=2), 20000, 4
    v = sample_views(n, k, spec, seed=11, identity_first=False)
    index = {tuple(c): i for i, c in enumerate(zip(*(all_views(1, spec)[key][0] for key in ("dx", "dy", "flip"))))}
    idx = np.vectorize(lambda a, b, c: index[(int(a), int(b), int(c))])(v["dx"], v["dy"], v["flip"])
    assert all(len(set(row)) == k for row in idx[:2000])  # distinct views within a sample
    df = spec.n_views - 1
    bound = df * (1 - 2 / (9 * df) + 4 * np.sqrt(2 / (9 * df))) ** 3
    for draws in (idx.ravel(), idx[:, 0], idx[:, 3]):
        counts = np.bincount(draws, minlength=spec.n_views)
        expected = len(draws) / spec.n_views
        assert ((counts - expected) ** 2 / expected).sum() < bound
        share = counts[0] / len(draws)  # index 0: the identity
        assert abs(share - 1 / 50) < 5 * np.sqrt(0.02 * 0.98 / len(draws))
    forced = sample_views(n, k, spec, seed=11)  # the default: view 0 is the identity
    assert (forced["dx"][:, 0] == 2).all() and (forced["dy"][:, 0] == 2).all() and (forced["flip"][:, 0] == 0).all()
    forced_idx = np.vectorize(lambda a, b, c: index[(int(a), int(b), int(c))])(forced["dx"], forced["dy"], forced["flip"])
    assert (forced_idx == 0).mean() > 0.25
    again = sample_views(n, k, spec, seed=11, identity_first=False)
    assert all((again[key] == v[key]).all() for key in ("dx", "dy", "flip"))
    assert v["dx"].dtype == np.int8 and v["flip"].dtype == np.uint8
    # more views than the view space holds: whole permutations, each view 2 or 3 times in 5
    small = sample_views(100, 5, ViewSpec(pad=0), seed=1, identity_first=False)
    assert (small["dx"] == 0).all() and set(np.unique(small["flip"].sum(axis=1))) <= {2, 3}


def test_no_augment_reads_view_zero_of_an_identity_first_store_and_refuses_a_uniform_one(
        tmp_path, tiny_model_dir, fmnist_shards, store):
    """``train --no-augment`` (the no-augmentation control): every draw is view 0, the plain image,
    with its own target; on a store whose view 0 is a random crop it is refused in one line."""
    import json

    import pytest
    from reliability_helpers import extract_cfg, train_cfg

    from pipeline.cache.config import ViewDraw
    from pipeline.cache.store import open_cache
    from pipeline.core.errors import UserError
    from pipeline.train.data import load_part, unaugmented
    from pipeline.train.sampler import MixedSampler
    from stages import extract, train

    plain = tmp_path / "identity-first.zarr"
    extract.run(extract_cfg(tiny_model_dir, fmnist_shards, plain, view_draw=ViewDraw.identity_first, views=3))
    cache = open_cache(str(plain))
    part, _ = load_part(cache, "train", shards_dir="", limit=0, view_spec=None, image_size=None)
    only = unaugmented(part, cache.plan.view_spec.pad)
    assert part.k == 3 and only.k == 1
    sampler = MixedSampler(n_real=only.n, k_real=only.k, batch_size=16, seed=0)
    drawn = np.concatenate([b.real_views for e in range(3) for b in sampler.batches(e)])
    assert len(drawn) == 3 * 64 and (drawn == 0).all()
    x = torch.rand(4, 1, 28, 28)
    assert torch.equal(apply_views(x, *(torch.from_numpy(getattr(only, a)[:4, 0]) for a in ("dx", "dy", "flip")),
                                   cache.plan.view_spec.pad), x)
    out = tmp_path / "run"
    train.run(train_cfg(plain, out, augment=False, dra_weight=0.5))
    assert json.loads((out / "metrics.json").read_text())["step"] == 2
    # plain AT without augmentation on the 3-view store trains exactly as on a store of the plain
    # images alone (1 view, the identity): the same batches, every image unshifted and unflipped
    single = tmp_path / "single.zarr"
    extract.run(extract_cfg(tiny_model_dir, fmnist_shards, single, view_draw=ViewDraw.identity_first, views=1))
    for store_path, name, aug in ((plain, "a", False), (single, "b", True)):
        train.run(train_cfg(store_path, tmp_path / name, augment=aug, dra_weight=0.0))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (tmp_path / "b" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="--no-augment reads each sample's view 0, but in cache part 'train'"):
        train.run(train_cfg(store, tmp_path / "refused", augment=False))
    assert not (tmp_path / "refused" / "metrics.json").exists()

"""views: the batched transform equals the plain numpy definition, view 0 is the identity."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.core.views import ViewSpec, apply_view_reference, apply_views, sample_views


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

"""The target specification: recorded in the store, and the store and readers follow its shape.

A target of another shape than (D,) (here a (2, 3, 3) map, as a spatial mode would produce) is
written, checked, read in RAM and streamed, normalised with per-element statistics and flattened
for the head without any change to the store or the readers: a new target mode touches the spec
and its producer/consumer only.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.cache.extractor import FeatureExtractor
from pipeline.cache.store import open_cache, verify_cache
from pipeline.cache.targets import Pooling, TargetSpec, select, targets_attrs, targets_from_attrs
from pipeline.cache.testing import split_record, write_store
from pipeline.core.errors import UserError
from pipeline.core.shards import read_split
from pipeline.diffusion.model import load_model
from pipeline.train.readers import InMemoryTargets, StreamingTargets

SHAPE = (2, 3, 3)


def test_spec_round_trip_and_malformed_specs_are_refused():
    spec = TargetSpec(100, "mid_block", Pooling.mean, (64,))
    assert spec.name == "t100-mid_block" and TargetSpec.from_attrs(spec.to_attrs()) == spec
    spatial = TargetSpec(100, "mid_block", Pooling.flatten, SHAPE)
    assert TargetSpec.from_attrs(spatial.to_attrs()) == spatial
    assert spec.size == 64 and spec.array_shape(5, 4) == (5, 4, 64) and spec.nbytes(5, 4) == 5 * 4 * 64 * 2
    good = spec.to_attrs()
    for bad in ({**good, "shape": [0]}, {**good, "shape": "512"}, {**good, "pooling": "max"}, {**good, "t": "100"},
                {**good, "name": "t100-up_blocks.0"}, {k: v for k, v in good.items() if k != "layer"}, "t100"):
        with pytest.raises(UserError, match="malformed target"):
            TargetSpec.from_attrs(bad)


def test_a_target_list_names_its_default_and_selection_refuses_absent_sets():
    specs = [TargetSpec(t, layer, Pooling.mean, (8,)) for t in (100, 10) for layer in ("mid_block", "up_blocks.0")]
    attrs = targets_attrs(specs)
    assert attrs["default_target"] == "t100-mid_block"
    got, default = targets_from_attrs(attrs)
    assert got == specs and default == specs[0]
    assert select(specs, default) == specs[0] and select(specs, default, None, "") == specs[0]
    assert select(specs, default, 10) == specs[2] and select(specs, default, layer="up_blocks.0") == specs[1]
    assert select(specs, default, 10, "up_blocks.0") == specs[3]
    with pytest.raises(UserError, match=r"no target set t=50 layer=mid_block; it holds: t=100 layer=mid_block, "
                                        r"t=100 layer=up_blocks.0, t=10 layer=mid_block, t=10 layer=up_blocks.0"):
        select(specs, default, 50)
    for bad in ({**attrs, "default_target": "t5-x"}, {**attrs, "targets": []}, {**attrs, "targets": attrs["targets"] * 2},
                {"default_target": "t100-mid_block"}):
        with pytest.raises(UserError, match="malformed target specification"):
            targets_from_attrs(bad)


def test_the_extractor_produces_what_its_spec_says(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    x, seeds = torch.rand(3, 1, 28, 28), torch.arange(3)
    for pooling in Pooling:
        ext = FeatureExtractor(model, t=50, layer="mid_block", pooling=pooling.value)
        (spec,) = ext.target_specs(28, 1)
        out = ext(x, seeds, None)
        assert tuple(out.shape) == (3, *spec.shape) and spec.pooling is pooling
    channels = FeatureExtractor(model, t=50, layer="mid_block", pooling="mean").target_specs(28, 1)[0].size
    assert spec.size > channels and spec.size % channels == 0  # flatten: C x H x W, mean: C


def test_several_layers_cost_one_forward_that_stops_after_the_last(tiny_model_dir):
    """Hooks on every requested block; the forward ends right after the last of them has run, so
    nothing after it runs, and each set equals a single-set extractor's."""
    model = load_model(str(tiny_model_dir))
    x, seeds = torch.rand(3, 1, 28, 28), torch.arange(3)
    ran = []
    blocks = dict(model.unet.named_modules())
    handles = [blocks[name].register_forward_hook(lambda m, i, o, name=name: ran.append(name))
               for name in ("down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1")]
    multi = FeatureExtractor(model, t=[50, 7], layer=["mid_block", "down_blocks.1"])
    out = multi.embed(x, seeds, None)
    for h in handles:
        h.remove()
    assert ran == ["down_blocks.1", "mid_block"] * 2  # two timesteps; up_blocks never ran
    assert list(out) == [(50, "mid_block"), (50, "down_blocks.1"), (7, "mid_block"), (7, "down_blocks.1")]
    for (t, layer), value in out.items():
        torch.testing.assert_close(value, FeatureExtractor(model, t=t, layer=layer)(x, seeds, None))
    with pytest.raises(ValueError, match="use embed"):
        multi(x, seeds, None)
    with pytest.raises(UserError, match="given twice"):
        FeatureExtractor(model, t=[50, 50], layer="mid_block")


def _spatial_store(fmnist_shards, url, plan_extra=None):
    ss = read_split(fmnist_shards / "train", limit=40)
    n, k = len(ss.keys), 2
    spec = TargetSpec(100, "mid_block", Pooling.flatten, SHAPE)
    feats = np.random.default_rng(0).normal(size=(n, k, *SHAPE)).astype(np.float16)
    write_store(str(url), keys=ss.keys, labels=ss.labels, k=k, targets=[spec], features={spec.name: feats},
                split=split_record(ss.path, ss.fingerprint), noise_seed=np.arange(n * k).reshape(n, k),
                rows_per_chunk=8, chunks_per_shard=2, plan=plan_extra)
    return spec, feats, n


def test_a_store_of_another_target_shape_needs_no_other_code(fmnist_shards, tmp_path):
    spec, feats, n = _spatial_store(fmnist_shards, tmp_path / "s.zarr")
    assert verify_cache(str(tmp_path / "s.zarr")) == []
    cache = open_cache(str(tmp_path / "s.zarr"))
    assert cache.targets == [spec] and cache.target() == spec
    part = cache.part("train")
    assert part.shape == SHAPE and part.d == 18
    rows, views = np.array([3, 17, 3, 39]), np.array([1, 0, 0, 1])
    want = feats[rows, views]
    np.testing.assert_array_equal(part.read(rows, views), want)
    np.testing.assert_array_equal(InMemoryTargets(part).get(rows, views), want)
    np.testing.assert_array_equal(StreamingTargets(part, capacity=2).get(rows, views), want)
    np.testing.assert_allclose(part.mean, feats.astype(np.float64).mean(axis=(0, 1)), atol=1e-5)
    assert part.std.shape == SHAPE
    centred = torch.from_numpy(want).float() - torch.from_numpy(part.mean)
    assert TargetSpec.flat(centred).shape == (4, 18)


def test_a_spec_that_disagrees_with_the_features_is_refused(fmnist_shards, tmp_path):
    """The head is sized from the spec: a root spec other than the parts' feature shape is one line."""
    lie = TargetSpec(100, "mid_block", Pooling.flatten, (18,))
    _spatial_store(fmnist_shards, tmp_path / "lie.zarr", {"targets": (lie,)})
    with pytest.raises(UserError, match=r"train/targets/t100-mid_block/features: shape \(40, 2, 2, 3, 3\) .*"
                                        r"target shape \[18\]"):
        open_cache(str(tmp_path / "lie.zarr")).part("train")
    assert any("target shape [18]" in p for p in verify_cache(str(tmp_path / "lie.zarr")))

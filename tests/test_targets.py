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
from pipeline.cache.store import NORMALISATION, CacheWriter, PartInit, open_cache, verify_cache
from pipeline.cache.targets import Pooling, TargetSpec
from pipeline.core.errors import UserError
from pipeline.core.shards import read_split
from pipeline.core.views import ViewSpec, sample_views
from pipeline.diffusion.model import load_model
from pipeline.train.sampler import InMemoryTargets, StreamingTargets

SHAPE = (2, 3, 3)


def test_spec_round_trip_and_malformed_specs_are_refused():
    spec = TargetSpec(100, "mid_block", Pooling.mean, (64,))
    assert "target_shape" not in spec.to_attrs()  # pooled: each part's "d" says it, as format 2 always did
    assert TargetSpec.from_attrs(spec.to_attrs(), fallback_d=64) == spec
    spatial = TargetSpec(100, "mid_block", Pooling.flatten, SHAPE)
    assert TargetSpec.from_attrs(spatial.to_attrs()) == spatial
    assert spec.size == 64 and spec.array_shape(5, 4) == (5, 4, 64) and spec.nbytes(5, 4) == 5 * 4 * 64 * 2
    old = {"t": 100, "layer": "mid_block", "pooling": "mean"}  # written before target_shape was recorded
    assert TargetSpec.from_attrs(old, fallback_d=64) == spec
    for bad in ({**old, "target_shape": [0]}, {**old, "target_shape": "512"}, {**old, "pooling": "max"},
                {"layer": "mid_block", "pooling": "mean", "target_shape": [4]}):
        with pytest.raises(UserError, match="malformed target"):
            TargetSpec.from_attrs(bad)


def test_the_extractor_produces_what_its_spec_says(tiny_model_dir):
    model = load_model(str(tiny_model_dir))
    x, seeds = torch.rand(3, 1, 28, 28), torch.arange(3)
    for pooling in Pooling:
        ext = FeatureExtractor(model, t=50, layer="mid_block", pooling=pooling.value)
        spec = ext.target_spec(28, 1)
        out = ext(x, seeds, None)
        assert tuple(out.shape) == (3, *spec.shape) and spec.pooling is pooling
    channels = FeatureExtractor(model, t=50, layer="mid_block", pooling="mean").target_spec(28, 1).size
    assert spec.size > channels and spec.size % channels == 0  # flatten: C x H x W, mean: C


def _spatial_store(fmnist_shards, url, plan_extra=None):
    ss = read_split(fmnist_shards / "train", limit=40)
    n, k = len(ss.keys), 2
    init = PartInit(ss.keys, ss.labels, sample_views(n, k, ViewSpec(), 0), np.arange(n * k).reshape(n, k), SHAPE,
                    {"shards": ss.path, "fingerprint": {"content_hash": ss.fingerprint["content_hash"]}})
    spec = TargetSpec(100, "mid_block", Pooling.flatten, SHAPE)
    plan = {**spec.to_attrs(), "image_size": 28, "normalisation": NORMALISATION, "view_spec": ViewSpec().to_dict(),
            **(plan_extra or {})}
    w = CacheWriter.open_or_create(str(url), plan=plan, parts={"train": init}, rows_per_chunk=8,
                                   chunks_per_shard=2, compressor="blosc-zstd")
    feats = np.random.default_rng(0).normal(size=(n, k, *SHAPE)).astype(np.float16)
    for s in range(w.n_shards("train")):
        a, b = w.shard_rows("train", s)
        w.write_shard("train", s, feats[a:b])
    w.finalize_part("train")
    w.finalize({})
    return spec, feats, n


def test_a_store_of_another_target_shape_needs_no_other_code(fmnist_shards, tmp_path):
    spec, feats, n = _spatial_store(fmnist_shards, tmp_path / "s.zarr")
    assert verify_cache(str(tmp_path / "s.zarr")) == []
    cache = open_cache(str(tmp_path / "s.zarr"))
    assert cache.target == spec
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
    _spatial_store(fmnist_shards, tmp_path / "lie.zarr", {"target_shape": [18]})
    with pytest.raises(UserError, match="holds targets of shape"):
        _ = open_cache(str(tmp_path / "lie.zarr")).target

"""(sample, view) sampling, exact mixing, resumability, and the target readers on a real store."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from pipeline.cache.store import open_cache
from pipeline.cache.targets import Pooling, TargetSpec
from pipeline.cache.testing import split_record, write_store
from pipeline.core.shards import read_split
from pipeline.train.readers import (
    InMemoryImages,
    InMemoryTargets,
    Prefetcher,
    StreamingImages,
    StreamingTargets,
)
from pipeline.train.sampler import MixedSampler, permutation

D = 8


def test_budget_is_the_real_set_in_steps_whatever_the_mix():
    """DM-AT's epoch (core/data/semisup.py): ceil(N_real / batch) full batches, 30% of them real here."""
    s = MixedSampler(n_real=300, k_real=4, n_syn=70, k_syn=2, batch_size=20, synthetic_fraction=0.7, seed=3)
    plain = MixedSampler(n_real=300, k_real=4, batch_size=20, seed=3)
    assert (s.b_real, s.b_syn, s.steps_per_epoch) == (6, 14, 15) and plain.steps_per_epoch == 15
    assert s.budget(30) == {"steps": 30, "batch_size": 20, "samples": 600, "real_samples": 180,
                            "synthetic_samples": 420}
    assert plain.budget(30)["samples"] == 600 and plain.budget(30)["real_samples"] == 600
    assert MixedSampler(n_real=301, k_real=1, batch_size=20, seed=0).steps_per_epoch == 16  # ceil
    rows, syn = [], []
    for b in (s.batch(e, i) for e in range(4) for i in range(s.steps_per_epoch)):
        assert len(b.real_rows) == 6 and len(b.syn_rows) == 14
        assert ((0 <= b.real_views) & (b.real_views < 4)).all() and ((0 <= b.syn_views) & (b.syn_views < 2)).all()
        rows.append(b.real_rows), syn.append(b.syn_rows)
    rows = np.concatenate(rows)  # 360 real draws: one full pass over the 300, then 60 of the next
    assert len(np.unique(rows[:300])) == 300 and len(np.unique(rows[300:])) == 60
    syn = np.concatenate(syn)  # 840 draws = 12 full passes over 70 synthetic samples
    assert all(len(np.unique(syn[p * 70:(p + 1) * 70])) == 70 for p in range(12))


def test_seeded_resumable_and_epochs_differ():
    a = MixedSampler(n_real=100, k_real=3, batch_size=10, seed=1)
    b = MixedSampler(n_real=100, k_real=3, batch_size=10, seed=1)
    in_order = [a.batch(e, i) for e in range(2) for i in range(a.steps_per_epoch)]
    direct = b.batch(1, 7)  # a fresh sampler jumping straight to (epoch 1, step 7): what --resume does
    assert np.array_equal(direct.real_rows, in_order[17].real_rows)
    assert np.array_equal(direct.real_views, in_order[17].real_views)
    assert not np.array_equal(in_order[0].real_rows, in_order[10].real_rows)
    c = MixedSampler(n_real=100, k_real=3, batch_size=10, seed=2)
    assert not np.array_equal(c.batch(0, 0).real_rows, in_order[0].real_rows)
    # views are drawn per sample, uniformly over K: all views used
    views = np.concatenate([x.real_views for x in in_order])
    assert set(np.unique(views)) == {0, 1, 2}


def test_processes_split_the_global_batch():
    one = MixedSampler(n_real=90, k_real=2, n_syn=50, batch_size=12, synthetic_fraction=0.5, seed=0)
    parts = [MixedSampler(n_real=90, k_real=2, n_syn=50, batch_size=12, synthetic_fraction=0.5, seed=0,
                          rank=r, world=2) for r in range(2)]
    for step in range(one.steps_per_epoch):
        g = one.batch(0, step)
        p0, p1 = (p.batch(0, step) for p in parts)
        assert len(p0.real_rows) == len(p1.real_rows) == 3 and len(p0.syn_rows) == 3
        assert sorted(np.r_[p0.real_rows, p1.real_rows]) == sorted(g.real_rows)
        assert sorted(np.r_[p0.syn_rows, p1.syn_rows]) == sorted(g.syn_rows)


def test_bad_mixing_refused():
    with pytest.raises(ValueError):
        MixedSampler(n_real=10, k_real=1, batch_size=8, synthetic_fraction=0.5, seed=0)  # no synthetic part
    with pytest.raises(ValueError):
        MixedSampler(n_real=10, k_real=1, batch_size=7, seed=0, world=2)


def test_chunk_aware_permutation():
    rng = np.random.default_rng(0)
    p = permutation(1024, rng, rows_per_chunk=16, window=4)
    assert sorted(p) == list(range(1024))
    for w in range(0, 1024, 64):  # each window of 4 chunks' rows comes from exactly 4 chunks
        assert len(np.unique(p[w:w + 64] // 16)) == 4
    p = permutation(1000, rng, rows_per_chunk=16, window=4)  # ragged last chunk
    assert sorted(p) == list(range(1000))
    # any 64 consecutive positions span at most 3 windows (the short one holds the ragged chunk)
    assert max(len(np.unique(p[i:i + 64] // 16)) for i in range(0, 1000 - 64)) <= 12
    assert not np.array_equal(p, np.arange(1000))


@pytest.fixture(scope="module")
def store(tmp_path_factory, fmnist_shards):
    """A real Zarr cache (real Fashion-MNIST keys and images) whose row (n, k) holds n and k in dims 0 and 1."""
    ss = read_split(fmnist_shards / "train", limit=300)
    n, k = len(ss.keys), 3
    spec = TargetSpec(100, "mid_block", Pooling.mean, (D,))
    feats = np.random.default_rng(0).normal(size=(n, k, D)).astype(np.float16)
    feats[:, :, 0] = np.arange(n)[:, None]
    feats[:, :, 1] = np.arange(k)[None, :]
    url = write_store(str(tmp_path_factory.mktemp("sampler") / "feats.zarr"), keys=ss.keys, labels=ss.labels, k=k,
                      targets=[spec], features={spec.name: feats}, images=ss.images,
                      split=split_record(ss.path, ss.fingerprint))
    return url, feats, ss.images


def test_readers_return_the_drawn_rows(store):
    url, feats, _ = store
    part = open_cache(url).part("train")
    ram, stream = InMemoryTargets(part), StreamingTargets(part, capacity=8)
    s = MixedSampler(n_real=part.n, k_real=part.k, batch_size=32, seed=5, chunk_real=part.rows_per_chunk, window=4)
    for b in itertools.islice(s.batches(0), part.n // 32):  # the steps within the first pass
        got = stream.get(b.real_rows, b.real_views)
        assert np.array_equal(got, ram.get(b.real_rows, b.real_views))
        assert np.array_equal(got[:, 0], b.real_rows) and np.array_equal(got[:, 1], b.real_views)
        assert np.array_equal(got, feats[b.real_rows, b.real_views])
        assert len(stream._chunks) <= 8  # memory stays flat
    # chunk-aware order: each of the 19 chunks read once in the pass
    assert stream.reads <= part.n_chunks


def test_streamed_images_are_the_rows_images_read_once_per_pass(store):
    """The image reader returns row n's image (uint8 NCHW, as the in-RAM path), reads each chunk
    once per pass in the chunk-aware order and holds at most ``capacity`` chunks."""
    url, _, images = store
    part = open_cache(url).part("train")
    assert part.has_images and part.image_shape == images.shape[1:]
    reader = StreamingImages(part, capacity=8)
    ram = InMemoryImages(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
    assert reader.shape == ram.shape == (1, 28, 28)
    s = MixedSampler(n_real=part.n, k_real=part.k, batch_size=32, seed=3, chunk_real=part.rows_per_chunk, window=4)
    for b in itertools.islice(s.batches(0), part.n // 32):
        got = reader.get(b.real_rows)
        assert got.dtype == torch.uint8 and got.is_contiguous()
        assert torch.equal(got, ram.get(b.real_rows))
        assert len(reader._chunks) <= 8
    assert reader.reads <= part.n_chunks


def test_prefetcher_order_and_errors():
    out = list(Prefetcher(iter(range(20)), lambda i: i * i, depth=3))
    assert out == [(i, i * i) for i in range(20)]

    def boom(i):
        if i == 5:
            raise RuntimeError("read failed")
        return i

    with pytest.raises(RuntimeError, match="read failed"):
        list(Prefetcher(iter(range(10)), boom))
    p = Prefetcher(iter(range(1000)), lambda i: i, depth=2)
    next(iter(p))
    p.close()  # stopping early does not hang

"""`train` under accelerate with 2 CPU processes: per-process memory and the split of each batch.

Memory: two caches for the same images differ only in total size. Both have the same rows, D and
chunk (= shard) BYTES (K views 2 vs 16, rows per chunk 16 vs 2), so the unit of I/O is the same and
only the number of units grows 8x. Streaming, each process holds a bounded number of chunks (the
reader's LRU) and verifies one shard at a time, so its peak RSS must not follow the added bytes.

Important: the peak does follow the unit's size. At the same rows per chunk a larger K or D makes every
chunk and shard larger: the reader holds ~10 chunks, and verification decodes a shard at a time in
zarr's threads, whose malloc arenas keep a few units' worth each (flat once every thread has seen a
unit or two, which is why the small cache here still has 32 shards). That is a per-unit cost, not
growth with the total size, so the unit bytes are held fixed here.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import numpy as np
import pytest
from launch import accelerate_run  # tests/ is on sys.path (rootdir conftest)

from pipeline.cache.targets import Pooling, TargetSpec
from pipeline.cache.testing import split_record, write_store
from pipeline.core.shards import read_split
from pipeline.data.config import PrepareConfig
from pipeline.train.sampler import MixedSampler
from pipeline.train.trainer import WINDOW

VIEWS_SMALL, VIEWS_BIG = 2, 16
UNIT_ROWS_X_VIEWS = 32  # rows per chunk x K, the same in both caches: equal chunk and shard bytes
CHUNKS_PER_SHARD = 1
BATCH = 32  # global; a small per-process batch keeps the allocator's noise in RSS to a few MiB


def write_cache(url: Path, shards: Path, n: int, k: int, d: int, seed: int) -> int:
    """A complete cache over the first n images of ``shards`` with random finite float16 features.

    Returns the raw feature bytes. Views and noise seeds are recorded as extract would, so train's
    checks against the image shards (fingerprint, keys, labels, view spec) all pass.
    """
    ss = read_split(shards, limit=n)
    spec = TargetSpec(100, "mid_block", Pooling.mean, (d,))
    rng = np.random.default_rng(seed)

    def features(a: int, b: int) -> np.ndarray:  # block by block: the features are never held whole
        bits = rng.integers(0, 2**16, size=(b - a, k, d), dtype=np.uint16) & 0xBFFF  # exponent < max: |x| < 2
        return bits.view(np.float16)

    write_store(str(url), keys=ss.keys, labels=ss.labels, k=k, targets=[spec], features={spec.name: features},
                split=split_record(ss.path, ss.fingerprint), seed=seed, noise_seed=np.arange(n * k).reshape(n, k),
                rows_per_chunk=UNIT_ROWS_X_VIEWS // k, chunks_per_shard=CHUNKS_PER_SHARD, compressor="blosc-lz4",
                plan={"image_size": int(ss.images.shape[1])})
    return n * k * d * 2


def accelerate_2cpu(*args: str) -> subprocess.CompletedProcess:
    proc = accelerate_run(list(args), timeout=600)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    return proc


def train_2cpu(store: Path, out: Path) -> dict:
    """One streamed epoch (every chunk of the cache passes through each process's reader)."""
    proc = accelerate_2cpu("-m", "pipeline", "train", "--cache", str(store), "--out", str(out), "--epochs", "1",
                           "--batch-size", str(BATCH), "--attack-steps", "1", "--head-hidden", "32",
                           "--real-limit", "0", "--memory-budget-mb", "0")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["target_mode"] == "stream" and metrics["processes"] == 2 and metrics["synchronised"]
    assert "peak_rss_mb=" in proc.stderr  # the progress line shows every process's peak
    return metrics


def memory_growth(shards: Path, tmp: Path, n: int, d: int) -> tuple[list[float], list[float], float]:
    """Peak RSS per process (MiB) on the small and the big cache, and the added feature MiB."""
    small = write_cache(tmp / "small.zarr", shards, n, VIEWS_SMALL, d, seed=1)
    big = write_cache(tmp / "big.zarr", shards, n, VIEWS_BIG, d, seed=2)
    a, b = train_2cpu(tmp / "small.zarr", tmp / "run-small"), train_2cpu(tmp / "big.zarr", tmp / "run-big")
    assert a["steps_per_epoch"] == b["steps_per_epoch"] == n // BATCH
    rss_small, rss_big = a["peak_rss_mb_per_process"], b["peak_rss_mb_per_process"]
    added = (big - small) / 2**20
    print(f"cache {small / 2**20:.0f} MiB: peak RSS {rss_small} MiB; cache {big / 2**20:.0f} MiB: {rss_big} MiB")
    assert len(rss_small) == len(rss_big) == 2 and min(rss_small) > 100  # a real process's own figure
    return rss_small, rss_big, added


def test_process_memory_does_not_follow_the_cache_size(fmnist_shards, tmp_path):
    """Quick: 512 images, 8 vs 64 MiB of features; in RAM the 56 MiB added would show in full."""
    small, big, added = memory_growth(fmnist_shards / "train", tmp_path, n=512, d=4096)
    assert added > 50
    for r in range(2):
        assert big[r] - small[r] < 0.25 * added, (r, small, big, added)


@pytest.mark.slow
def test_process_memory_does_not_follow_the_cache_size_big(fmnist_dir, tmp_path):
    """2048 images, 48 vs 384 MiB of features: each process grows by under 10% of the 336 MiB added."""
    from stages import prepare

    prepare.run(PrepareConfig(source=str(fmnist_dir), out=str(tmp_path / "real"), key_prefix="fmnist", limit=2048,
                              shard_size=1024))
    small, big, added = memory_growth(tmp_path / "real" / "train", tmp_path, n=2048, d=6144)
    assert added > 300
    for r in range(2):
        assert big[r] - small[r] < 0.10 * added, (r, small, big, added)


SPLIT_CHECK = """
import json, sys
from pipeline.train.config import TrainConfig
from pipeline.train import trainer

cfg = TrainConfig(cache=sys.argv[1], out=sys.argv[2], real_limit=0, batch_size=int(sys.argv[3]), memory_budget_mb=0,
                  verify=False, head_hidden=8)
tr = trainer.Trainer.create(cfg)
feed = tr.feed(0, 0)
mine = [(b.real_rows.tolist(), b.real_views.tolist(), len(x["target"])) for b, x in feed]
feed.close()
everyone = tr.rt.gather({"rank": tr.rt.rank, "world": tr.rt.world, "batches": mine})
if tr.rt.is_main:
    open(sys.argv[4], "w").write(json.dumps(everyone))
"""


def test_processes_read_disjoint_halves_of_each_global_batch(fmnist_shards, tmp_path):
    """What each of 2 launched processes assembles (rows read from the streamed targets) per step.

    tests/test_sampler.py shows the sampler splits a batch given rank and world; this shows that
    train, launched, gives its processes different ranks and reads each process's own half.
    """
    store = tmp_path / "c.zarr"
    write_cache(store, fmnist_shards / "train", 256, 4, 8, seed=3)
    script, result = tmp_path / "split_check.py", tmp_path / "split.json"
    script.write_text(SPLIT_CHECK)
    accelerate_2cpu(str(script), str(store), str(tmp_path / "unused"), str(BATCH), str(result))
    got = json.loads(result.read_text())
    assert [(p["rank"], p["world"]) for p in got] == [(0, 2), (1, 2)]
    whole = MixedSampler(n_real=256, k_real=4, batch_size=BATCH, seed=0, chunk_real=UNIT_ROWS_X_VIEWS // 4,
                         window=WINDOW)
    assert len(got[0]["batches"]) == len(got[1]["batches"]) == whole.steps_per_epoch == 256 // BATCH
    for step, (p0, p1) in enumerate(zip(got[0]["batches"], got[1]["batches"])):
        g = whole.batch(0, step)
        assert len(p0[0]) == len(p1[0]) == BATCH // 2 and p0[2] == p1[2] == BATCH // 2
        assert not set(p0[0]) & set(p1[0])
        pairs = sorted(zip(p0[0] + p1[0], p0[1] + p1[1]))
        assert pairs == sorted(zip(g.real_rows.tolist(), g.real_views.tolist()))

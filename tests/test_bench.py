"""`bench` at a tiny size on real Fashion-MNIST: every figure present, positive and finite; and the
timing helpers it rests on (interleaving, a child's own peak RSS, the bare forward, the whole-
forward online extractor). Speed itself is never asserted here."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from pipeline.bench import benchmark as B
from pipeline.bench.config import BenchConfig
from pipeline.cache.extractor import FeatureExtractor
from pipeline.cli import main
from pipeline.core.errors import UserError
from pipeline.diffusion.model import DiffusionModel, make_scheduler, tiny_unet
from stages import bench

KEYS = ["extract_stage_over_forward", "train_cached_over_plain",
        "train_stream_over_plain", "train_online_over_cached", "train_online_full_over_cached",
        "reader_over_train", "reader_peak_rss_mb", "reader_peak_rss_mb_half", "reader_rss_baseline_mb",
        "reader_budget_mb", "reader_cache_mb", "bytes_per_view", "compression_ratio", "multi_over_single",
        "multi_over_single_per_timestep"]


def tiny(fmnist_dir, tmp_path, **kw) -> BenchConfig:
    base = dict(source=str(fmnist_dir), out=str(tmp_path / "bench.json"), n=128, views=2, batch_size=64,
                chunks_per_shard=1, repeats=1, train_steps=2, train_batch_size=32, attack_steps=1,
                memory_budget_mb=2, stream_cache_mb=8, two_proc=False, device="cpu", multi_t="100,20",
                multi_repeats=1, image_rows_small=1024, image_rows_big=4096, image_steps=2, image_reader_batches=4,
                ingest_rows_small=300, ingest_rows_big=1200)
    return BenchConfig(**{**base, **kw})


@pytest.mark.e2e
def test_tiny_bench_reports_every_figure(fmnist_dir, tmp_path, capsys):
    res = bench.run(tiny(fmnist_dir, tmp_path))
    for key in KEYS:
        assert key in res, key
        assert math.isfinite(res[key]) and res[key] > 0, (key, res[key])
    # a difference of two timings (stage minus its fixed costs): at this size it may be noise around 0
    assert math.isfinite(res["extract_over_forward"]) and res["extract_fixed_s"] > 0
    assert res["reader_streamed"] is True  # the store is 4x the budget: the reader must stream
    assert res["reader_cache_mb"] > 2 * res["reader_budget_mb"]
    assert res["reader_chunk_reads_per_chunk"] == 1.0  # chunk-aware order: each chunk read once per pass
    assert res["raw_bytes_per_view"] == 2 * res["feature_dim"]
    assert res["multi_timesteps"] == 2 and res["multi_layers"] == 2
    assert sorted(res["multi_bytes_per_view_per_set"]) == ["t100-mid_block", "t100-up_blocks.0", "t20-mid_block",
                                                           "t20-up_blocks.0"]
    assert all(0 < b < 2 * 64 * 1.2 for b in res["multi_bytes_per_view_per_set"].values())  # float16, 64 channels
    # images streamed with their targets: both training children and the "stream" side of the ratio stream
    assert res["images_child_modes"] == ["stream", "stream"] and res["images_ratio_modes"] == {"stream": "stream", "ram": "ram"}
    assert res["images_added_mb"] == 3072 * 3 * 1024 / 2**20 and res["images_disk_mb_big"] > 0.9 * 12  # random pixels
    assert all(res[k] > 0 for k in ("images_peak_rss_mb_big", "images_stream_over_ram", "images_reader_over_train",
                                    "images_pipeline_over_train"))
    # ingest: prepare and extract of npz sets in fresh processes, both encodings on the small one
    assert sorted(res["ingest_runs"]) == ["big_npy", "small_npy", "small_png"]
    assert all(r["prepare_peak_rss_mb"] > 0 and r["extract_peak_rss_mb"] > 0 and r["store_bytes"] > 0
               and r["shard_bytes"] >= r["rows"] * 3072 * 0.99 for r in res["ingest_runs"].values())
    assert res["ingest_added_mb"] == 900 * 3072 / 2**20
    assert set(res["ingest_encodings"]) == {f"{s}_{e}" for s in ("random_cifar", "fmnist") for e in ("png", "npy")}
    assert res["ingest_encodings"]["fmnist_npy"]["bytes_per_image"] == 784 + 128  # the raw pixels behind a header
    m = res["machine"]
    assert m["cores"] >= 1 and m["torch_threads"] >= 1 and m["cpu"]
    assert set(res["targets"]) >= {"extract_over_forward", "train_cached_over_plain", "reader_over_train"}
    written = json.loads((tmp_path / "bench.json").read_text())
    assert written["train_cached_over_plain"] == res["train_cached_over_plain"]
    out = capsys.readouterr().out
    assert "AT+DRA cached / plain AT" in out and "machine:" in out


@pytest.mark.slow
def test_tiny_bench_two_processes(fmnist_dir, tmp_path):
    res = bench.run(tiny(fmnist_dir, tmp_path, two_proc=True, online_full=False))
    assert res["extract_2proc_speedup"] > 0 and "accelerate" in res["extract_2proc_method"]


def test_bad_sizes_refused_before_work(fmnist_dir, tmp_path):
    with pytest.raises(UserError, match="two training batches"):
        bench.run(tiny(fmnist_dir, tmp_path, n=40))
    with pytest.raises(UserError, match="--only: choose among"):
        bench.run(tiny(fmnist_dir, tmp_path, only="images,gpu"))
    with pytest.raises(UserError, match="--repeats"):
        bench.run(tiny(fmnist_dir, tmp_path, repeats=0))
    with pytest.raises(UserError, match="not found"):
        bench.run(tiny(fmnist_dir, tmp_path, source=str(tmp_path / "nope")))
    assert not (tmp_path / "bench.json").exists()
    with pytest.raises(SystemExit) as exc:
        main(["bench", "--n", "0", "--out", str(tmp_path / "b.json")])
    assert exc.value.code == 2


def test_interleaved_alternates_and_drops_warmup():
    calls = []
    times = B.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=1)
    assert calls == ["a", "b", "b", "a", "a", "b", "b", "a"]
    assert [len(v) for v in times.values()] == [3, 3]


def test_child_peak_rss_is_its_own():
    """ru_maxrss survives fork+exec on Linux; the child must not report the parent's size."""
    big = np.ones(300 * 2**20 // 8)  # 300 MiB resident in the parent
    child = B.run_child("import json, pipeline.bench.benchmark as b; print(json.dumps({'rss': b.peak_rss_mb()}))")
    assert B.peak_rss_mb() > 300 and child["rss"] < B.peak_rss_mb() - 200
    del big


def _tiny_model() -> DiffusionModel:
    torch.manual_seed(0)
    return DiffusionModel(tiny_unet(28, 1, 10).eval(), make_scheduler(), 10, 10, 28, 1, "x", "tiny")


def test_bare_forward_stops_at_the_block():
    model = _tiny_model()
    seen = []
    model.unet.conv_out.register_forward_hook(lambda *_: seen.append("out"))
    model.unet.mid_block.register_forward_hook(lambda *_: seen.append("mid"))
    B.bare_forward(model.unet, model.scheduler, torch.rand(10, 1, 28, 28), t=100, layer="mid_block", batch_size=4,
                   class_label=10)
    assert seen == ["mid"] * 3  # three batches, none reached the output layer


def test_whole_forward_extractor_gives_the_same_targets():
    model = _tiny_model()
    early = FeatureExtractor(model, t=100, layer="mid_block")
    whole = FeatureExtractor(model, stop_early=False, **early.options())
    reached = []
    model.unet.conv_out.register_forward_hook(lambda *_: reached.append(1))
    x, seeds = torch.rand(6, 1, 28, 28), torch.arange(6)
    a = early(x, seeds, None)
    assert not reached
    b = whole(x, seeds, None)
    assert reached and torch.allclose(a, b, atol=1e-6)

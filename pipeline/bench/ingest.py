"""Ingest figures of `python -m pipeline bench`: the two stages in front of training on generated
sets of DM-AT's size. CIFAR-sized (32x32x3) npz sets of random pixels, ``ingest_rows_small`` and
``ingest_rows_big`` rows, go through ``prepare`` (``--workers``) and ``extract`` (one view, the
UNet stopped at its first block: what scales with the rows is reading, decoding and writing, and
the UNet's share is what a GPU changes), each in a fresh process: peak RSS (growth as a fraction
of the image data added, target <= 5%), images/s, bytes on disk. The two shard encodings (PNG, raw
.npy) are compared on the small set and on real Fashion-MNIST images; the big set uses the
default one for npz sources."""

from __future__ import annotations

import io
import json
import os
import shutil
import zipfile
from pathlib import Path

import numpy as np

from pipeline.bench import benchmark as B
from pipeline.bench.config import BenchConfig
from pipeline.bench.measure import ROOT, say

SHAPE = (32, 32, 3)
ROW_BYTES = int(np.prod(SHAPE))
PER_GPU_NOTE = ("extract images/s here is the 2-core CPU's, with the UNet stopped at its first block; on a GPU "
                "the full UNet forward sets the rate (bench --profile gpu: extract_views_per_s)")


def write_npz(path: Path, rows: int, seed: int, block: int = 1 << 16) -> None:
    """An uncompressed npz of ``rows`` random CIFAR-sized images and labels, written block by block
    (the generator never holds the set)."""
    rng = np.random.default_rng([seed, rows])
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        with zf.open("image.npy", "w", force_zip64=True) as fh:
            np.lib.format.write_array_header_1_0(fh, {"descr": "|u1", "fortran_order": False, "shape": (rows, *SHAPE)})
            for a in range(0, rows, block):
                fh.write(rng.bytes(min(block, rows - a) * ROW_BYTES))
        buf = io.BytesIO()
        np.save(buf, rng.integers(0, 10, rows).astype(np.int64))
        zf.writestr("label.npy", buf.getvalue())


PREPARE_CHILD = """
import json, resource, sys, time
sys.argv = ["bench"]
from pipeline.bench import benchmark as B
from pipeline.data.config import PrepareConfig
from stages import prepare
cfg = PrepareConfig(**json.loads({cfg!r}))
t0 = time.perf_counter()
fp = prepare.run(cfg)
wall = time.perf_counter() - t0
print(json.dumps({{"seconds": wall, "peak_rss_mb": B.peak_rss_mb(),
                  "worker_peak_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "rows": fp["train"]["count"]}}))
"""

EXTRACT_CHILD = """
import json, time
from pipeline.bench import benchmark as B
from pipeline.bench.measure import quiet
from pipeline.cache.build import extract
from pipeline.cache.config import ExtractConfig
cfg = ExtractConfig(**json.loads({cfg!r}))
t0 = time.perf_counter()
quiet(extract, cfg)
print(json.dumps({{"seconds": time.perf_counter() - t0, "peak_rss_mb": B.peak_rss_mb()}}))
"""


def _child(template: str, cfg: dict) -> dict:
    return B.run_child(template.format(cfg=json.dumps(cfg)), env={"PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"})


def _tiny_model(work: Path, seed: int) -> Path:
    import torch

    from pipeline.diffusion.model import make_scheduler, save_model, tiny_unet

    torch.manual_seed(seed)
    model = work / "tiny-unet-32"
    if not model.exists():
        save_model(model, tiny_unet(image_size=32, in_channels=3), make_scheduler(), {})
    return model


def _test_split(work: Path, seed: int) -> Path:
    """The 1000-row test split extract needs beside each train split."""
    from pipeline.core.shards import Split, make_keys, write_split

    path = work / "test-split"
    if not path.exists():
        rng = np.random.default_rng([seed, 9])
        images = np.frombuffer(rng.bytes(1000 * ROW_BYTES), np.uint8).reshape(1000, *SHAPE)
        write_split(path, Split(images, rng.integers(0, 10, 1000), [str(c) for c in range(10)]),
                    make_keys("bench", "test", 1000), shard_size=1000, progress=False, encoding="npy")
    return path


def encodings(cfg: BenchConfig, n: int) -> dict:
    """PNG vs raw .npy members on random CIFAR-sized pixels and on real Fashion-MNIST images:
    bytes per image and images/s of encoding and decoding (one process, interleaved repeats)."""
    from pipeline.core.members import encode_npy, encode_png
    from pipeline.core.shards import _decode
    from pipeline.data.sources import read_source

    sets = {"random_cifar": np.frombuffer(np.random.default_rng(cfg.seed).bytes(n * ROW_BYTES), np.uint8).reshape(n, *SHAPE),
            "fmnist": read_source(cfg.source, limit=n)["train"].images}
    out = {}
    for name, images in sets.items():
        for enc, fn in (("png", encode_png), ("npy", encode_npy)):
            blobs = [fn(im) for im in images]
            times = B.interleaved({"encode": lambda fn=fn, images=images: [fn(im) for im in images],
                                   "decode": lambda enc=enc, blobs=blobs: [
                                       _decode({"__key__": "k", enc: b, "cls": b"0"}, "bench") for b in blobs]},
                                  rounds=3)
            out[f"{name}_{enc}"] = {"bytes_per_image": float(np.mean([len(b) for b in blobs])),
                                    "raw_bytes_per_image": int(np.prod(images.shape[1:])),
                                    "encode_per_s": n / B.median(times["encode"]),
                                    "decode_per_s": n / B.median(times["decode"])}
    return out


def bench_ingest(cfg: BenchConfig, work: Path) -> dict:
    model, test = _tiny_model(work, cfg.seed), _test_split(work, cfg.seed)
    runs: dict[str, dict] = {}
    plan = [("small", cfg.ingest_rows_small, "png"), ("small", cfg.ingest_rows_small, "npy"),
            ("big", cfg.ingest_rows_big, "npy")]
    for size, rows, enc in plan:
        src = work / f"set-{rows}.npz"
        if not src.exists():
            say(f"ingest: writing a {rows}-row CIFAR-sized npz ({rows * ROW_BYTES / 2**30:.1f} GiB)")
            write_npz(src, rows, cfg.seed)
        shards = work / f"shards-{rows}-{enc}"
        say(f"ingest: prepare {rows} rows, {enc} members, {cfg.ingest_workers} workers")
        prep = _child(PREPARE_CHILD, {"source": str(src), "format": "npz", "out": str(shards), "key_prefix": "bench",
                                      "shard_size": 10_000, "encoding": enc, "workers": cfg.ingest_workers})
        if not (shards / "test").exists():
            os.symlink(test, shards / "test")
        say(f"ingest: extract {rows} rows from {enc} shards (1 view, UNet to down_blocks.0)")
        store = work / f"feats-{rows}-{enc}.zarr"
        ext = _child(EXTRACT_CHILD, {"model": str(model), "real_splits": str(shards), "synthetic": "",
                                     "out": str(store), "t": [100], "layer": ["down_blocks.0"], "views": "1",
                                     "batch_size": 512, "seed": cfg.seed})
        runs[f"{size}_{enc}"] = {
            "rows": rows, "npz_bytes": src.stat().st_size, "shard_bytes": B.dir_bytes(shards / "train"),
            "store_bytes": B.dir_bytes(store), "prepare_s": prep["seconds"], "prepare_per_s": rows / prep["seconds"],
            "prepare_peak_rss_mb": prep["peak_rss_mb"], "prepare_worker_peak_rss_mb": prep["worker_peak_rss_mb"],
            "extract_s": ext["seconds"], "extract_per_s": rows / ext["seconds"], "extract_peak_rss_mb": ext["peak_rss_mb"]}
        for path in (shards / "train", store):  # the disk a 2M-row set takes, given back before the next
            shutil.rmtree(path, ignore_errors=True)
    small, big = runs["small_npy"], runs["big_npy"]
    added_mb = (big["rows"] - small["rows"]) * ROW_BYTES / 2**20
    per_20m = 20e6 / 3600
    return {
        "ingest_runs": runs, "ingest_encodings": encodings(cfg, min(4000, cfg.ingest_rows_small)), "ingest_added_mb": added_mb,
        **{f"ingest_{stage}_peak_rss_mb_{size}": runs[f"{size}_npy"][f"{stage}_peak_rss_mb"]
           for stage in ("prepare", "extract") for size in ("small", "big")},
        "ingest_workers": cfg.ingest_workers, "ingest_extract_note": PER_GPU_NOTE,
        "ingest_prepare_rss_growth_fraction": (big["prepare_peak_rss_mb"] - small["prepare_peak_rss_mb"]) / added_mb,
        "ingest_extract_rss_growth_fraction": (big["extract_peak_rss_mb"] - small["extract_peak_rss_mb"]) / added_mb,
        "ingest_prepare_rss_big_over_small": big["prepare_peak_rss_mb"] / small["prepare_peak_rss_mb"],
        "ingest_extract_rss_big_over_small": big["extract_peak_rss_mb"] / small["extract_peak_rss_mb"],
        "ingest_prepare_per_s": big["prepare_per_s"], "ingest_extract_per_s": big["extract_per_s"],
        "ingest_prepare_png_over_npy_s": runs["small_png"]["prepare_s"] / runs["small_npy"]["prepare_s"],
        "ingest_extract_png_over_npy_s": runs["small_png"]["extract_s"] / runs["small_npy"]["extract_s"],
        "ingest_shard_png_over_npy_bytes": runs["small_png"]["shard_bytes"] / runs["small_npy"]["shard_bytes"],
        "ingest_prepare_hours_20m": per_20m / big["prepare_per_s"],
        "ingest_extract_io_hours_20m": per_20m / big["extract_per_s"],
    }

"""The data-scarce study's driver (scripts/scarce.py): what it records of a store built on one machine.

Its targets differ between processors by float rounding, so each machine's store has its own digest;
the driver also records the digest of everything but the targets (the images and views), which must
be the same on every machine for the study to train on one data set."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

from pipeline.cache.targets import Pooling, TargetSpec
from pipeline.cache.testing import split_record, write_store
from pipeline.core.shards import read_split

ROOT = Path(__file__).resolve().parents[1]
SPEC = TargetSpec(100, "mid_block", Pooling.mean, (8,))


def driver():  # noqa: ANN201 - the script, imported as a module
    spec = importlib.util.spec_from_file_location("scarce", ROOT / "scripts" / "scarce.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def store_info(url: str) -> dict:
    out = subprocess.run([sys.executable, "-c", driver().STORE_INFO, url], cwd=ROOT, check=True,
                         capture_output=True, text=True)
    return json.loads(out.stdout)


def test_images_digest_ignores_the_targets_and_sees_the_images(tmp_path, fmnist_shards):
    ss = read_split(fmnist_shards / "train", limit=40)

    def make(url: Path, features: np.ndarray, images: np.ndarray, **layout: object) -> str:
        return write_store(str(url), keys=ss.keys, labels=ss.labels, k=2, targets=[SPEC], features={SPEC.name: features},
                           images=images, split=split_record(ss.path, ss.fingerprint), **layout)

    images = ss.images
    feats = np.random.default_rng(0).standard_normal((40, 2, 8)).astype(np.float16)
    a = store_info(make(tmp_path / "a.zarr", feats, images))
    # another processor: the same images and views, targets one float16 step apart
    rounded = np.nextafter(feats, np.float16(np.inf)).astype(np.float16)
    b = store_info(make(tmp_path / "b.zarr", rounded, images))
    other = images.copy()
    other[3, 5, 5, 0] ^= 1  # one pixel of one image
    c = store_info(make(tmp_path / "c.zarr", feats, other))
    assert a["parts"] == {"train": {"n": 40, "k": 2}}
    assert a["digest"] != b["digest"] and a["images_digest"] == b["images_digest"]
    assert c["images_digest"] != a["images_digest"]
    # the same data stored another way (codec, chunks): the bytes differ, the decoded arrays do not
    d = store_info(make(tmp_path / "d.zarr", feats, images, compressor="zstd", rows_per_chunk=8, chunks_per_shard=2))
    assert d["digest"] != a["digest"] and d["images_digest"] == a["images_digest"]


def test_standard_autoattack_table_waits_for_both_versions_of_every_run(tmp_path):
    """The driver draws the standard-AutoAttack table only when every run has both versions: while one
    is still being evaluated the report would refuse the other, and the redraw would stop half done."""
    aa_matched = driver().aa_matched

    def put(version, key):
        (tmp_path / f"scarce-aa-{version}" / key).mkdir(parents=True, exist_ok=True)
        (tmp_path / f"scarce-aa-{version}" / key / "seed2.json").write_text("{}")

    assert not aa_matched(tmp_path)  # nothing yet
    put("fast", "at")
    assert not aa_matched(tmp_path)  # no standard result
    put("standard", "at")
    assert aa_matched(tmp_path)
    put("standard", "dmat")
    assert not aa_matched(tmp_path)  # dmat's fast subset is still running
    put("fast", "dmat")
    assert aa_matched(tmp_path)

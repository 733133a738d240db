"""Shards, caches and stage outputs on fsspec URLs: ``memory://`` and ``file://`` stand in for an
object store (same code path: fsspec for bytes, webdataset for tar members, zarr for the cache)."""

from __future__ import annotations

import fsspec
import numpy as np
import pytest

from pipeline.cache.config import ExtractConfig
from pipeline.cache.store import open_cache, verify_cache
from pipeline.core.errors import UserError
from pipeline.core.shards import Split, read_split, write_split
from pipeline.core.storage import STAGING_MARKER, join
from pipeline.data.config import PrepareConfig
from pipeline.evaluate.config import AutoAttackVersion, EvaluateConfig
from pipeline.train.config import TrainConfig
from stages import evaluate, extract, prepare, train


def _url(scheme: str, tmp_path, name: str) -> str:
    return f"memory://{tmp_path.name}/{name}" if scheme == "memory" else f"file://{tmp_path}/{name}"


@pytest.fixture(scope="module")
def small(fmnist_shards):
    ss = read_split(fmnist_shards / "train", limit=50)
    return ss.keys, Split(ss.images, ss.labels, ss.fingerprint["classes"])


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_split_on_url_equals_local(scheme, small, tmp_path):
    keys, split = small
    local = write_split(tmp_path / "local", split, keys, shard_size=20, progress=False)
    url = _url(scheme, tmp_path, "remote")
    remote = write_split(url, split, keys, shard_size=20, progress=False)
    assert remote == local  # same shards, same checksums, same content hash
    back = read_split(url)
    assert back.keys == keys and np.array_equal(back.images, split.images)
    fs, path = fsspec.core.url_to_fs(url)
    assert sorted(p.rsplit("/", 1)[-1] for p in fs.ls(path, detail=False)) == [
        "fingerprint.json", "shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert fs.cat_file(f"{path}/shard-000001.tar") == (tmp_path / "local" / "shard-000001.tar").read_bytes()


def test_url_split_is_incomplete_until_its_fingerprint_and_stale_shards_go(small, tmp_path):
    keys, split = small
    url = _url("memory", tmp_path, "s")
    write_split(url, split, keys, shard_size=10, progress=False)  # 5 shards
    fs, path = fsspec.core.url_to_fs(url)
    fs.rm(f"{path}/fingerprint.json")  # what a foreign folder, or an interrupted write, looks like
    with pytest.raises(UserError, match="not a complete shard set"):
        read_split(url)
    with pytest.raises(UserError, match="not an output of this stage"):  # no marker: not ours, kept
        write_split(url, split, keys, shard_size=10, progress=False)
    assert len(fs.ls(path, detail=False)) == 5
    fs.pipe_file(f"{path}/{STAGING_MARKER}", b"")  # an interrupted write of ours leaves its marker
    write_split(url, Split(split.images[:15], split.labels[:15], split.classes), keys[:15], shard_size=10,
                progress=False)  # rewritten: the old 5 shards do not survive next to the new 2
    assert len(fs.ls(path, detail=False)) == 3 and len(read_split(url).keys) == 15
    fs.pipe_file(f"{path}/shard-000001.tar", b"garbage")
    with pytest.raises(UserError, match="checksum mismatch"):
        read_split(url)


def test_join_keeps_url_slashes():
    assert join("s3://bucket/data/", "train", "fingerprint.json") == "s3://bucket/data/train/fingerprint.json"
    assert join("memory://x", "a") == "memory://x/a"


def test_stages_end_to_end_on_memory_urls(fmnist_dir, tiny_model_dir, tmp_path, capsys):
    """prepare -> extract -> train -> evaluate with every shard set and the cache in ``memory://``."""
    stages_end_to_end(f"memory://{tmp_path.name}", fmnist_dir, tiny_model_dir, tmp_path)


def stages_end_to_end(base: str, fmnist_dir, tiny_model_dir, tmp_path) -> str:
    """prepare -> extract -> train -> evaluate with shards and cache under ``base``; returns the store."""
    prepare.run(PrepareConfig(source=str(fmnist_dir), out=f"{base}/real", limit=96, shard_size=40))
    extract.run(ExtractConfig(model=str(tiny_model_dir), real_splits=f"{base}/real", synthetic="",
                              out=f"{base}/feats.zarr", views=2, batch_size=64, rows_per_chunk=16,
                              chunks_per_shard=2))
    cache = open_cache(f"{base}/feats.zarr")
    assert cache.part("train").shards == f"{base}/real/train" and verify_cache(f"{base}/feats.zarr") == []
    metrics = train.run(TrainConfig(cache=f"{base}/feats.zarr", out=str(tmp_path / "model"), epochs=1,
                                    batch_size=32, attack_steps=1, head_hidden=16, real_limit=0))
    assert metrics["steps_per_epoch"] == 3
    result = evaluate.run(EvaluateConfig(checkpoint=str(tmp_path / "model"), shards=f"{base}/real/test", n=32,
                                         out=str(tmp_path / "eval.json"), pgd_steps=2, autoattack=AutoAttackVersion.none))
    assert result["n"] == 32 and 0 <= result["pgd"] <= result["clean"] <= 1
    return f"{base}/feats.zarr"


def test_generate_to_memory_url(tiny_model_dir, fmnist_shards, tmp_path):
    import json

    from pipeline.generate.config import GenerateConfig
    from stages import generate

    url = f"memory://{tmp_path.name}/syn"
    generate.run(GenerateConfig(model=str(tiny_model_dir), real_train=str(fmnist_shards / "train"), out=url, n=12,
                                shard_size=5, batch_size=6, sample_steps=2, bf16=False, check=False))
    fs, path = fsspec.core.url_to_fs(url)
    assert json.loads(fs.cat_file(f"{path}/generate.json"))["n"] == 12
    assert fs.cat_file(f"{path}/grid.png")[:4] == b"\x89PNG"
    assert read_split(f"{url}/train").labels.tolist() == [i % 10 for i in range(12)]


@pytest.mark.parametrize("stage,args", [
    ("train", ["--cache", "{store}"]),
    ("evaluate", ["--checkpoint", "{ckpt}", "--shards", "{real}/test"]),
    ("diffusion", ["--shards", "{real}/train"]),
    ("report", ["--evals", "{tmp}"]),
], ids=["train", "evaluate", "diffusion", "report"])
@pytest.mark.parametrize("scheme", ["s3://bucket/run", "file://{tmp}/run"])
def test_a_stage_that_writes_local_files_refuses_a_url_out(stage, args, scheme, store, checkpoint, fmnist_shards,
                                                           tmp_path, capsys, monkeypatch):
    """pathlib would fold ``s3://bucket/run`` into a local folder ``s3:/bucket/run``: refused in one
    line before any work, nothing written anywhere (prepare, generate and extract write URLs through
    fsspec: test_s3.py, above)."""
    from reliability_helpers import assert_one_error_line, run_cli

    monkeypatch.chdir(tmp_path)
    fill = {"store": store, "ckpt": checkpoint, "real": fmnist_shards, "tmp": tmp_path}
    out = scheme.format(**fill)
    code, _, err = run_cli(capsys, [stage, *[a.format(**fill) for a in args], "--out", out])
    assert "writes local files only" in assert_one_error_line(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == [], list(tmp_path.iterdir())


@pytest.mark.parametrize("url", ["gs://bucket/x", "nope://bucket/x"], ids=["backend-not-installed", "unknown-scheme"])
@pytest.mark.parametrize("argv", [
    ["prepare", "--source", "{fmnist}", "--out", "{url}"],
    ["extract", "--model", "{model}", "--real-splits", "{real}", "--synthetic", "", "--out", "{url}/feats.zarr"],
    ["extract", "--model", "{model}", "--real-splits", "{url}", "--synthetic", "", "--out", "{tmp}/f.zarr"],
    ["train", "--cache", "{url}/feats.zarr", "--out", "{tmp}/run"],
    ["cache", "verify", "{url}/feats.zarr"],
], ids=["prepare-out", "extract-out", "extract-in", "train-cache", "verify"])
def test_a_url_this_machine_cannot_open_is_one_line(url, argv, fmnist_dir, model_dir, fmnist_shards, tmp_path,
                                                     capsys):
    import importlib.util

    if url.startswith("gs:") and importlib.util.find_spec("gcsfs"):
        pytest.skip("gcsfs is installed here: gs:// is a back-end this machine has")
    from reliability_helpers import assert_one_error_line, run_cli

    fill = {"url": url, "fmnist": fmnist_dir, "model": model_dir, "real": fmnist_shards, "tmp": tmp_path}
    code, _, err = run_cli(capsys, [a.format(**fill) for a in argv])
    assert url.split("://")[0] in assert_one_error_line(code, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == []


@pytest.mark.parametrize("argv", [["cache", "verify", "s3://bucket/feats.zarr"],
                                  ["train", "--cache", "s3://bucket/feats.zarr", "--out", "{tmp}/run"]],
                         ids=["verify", "train"])
def test_no_credentials_for_an_object_store_is_one_line(argv, tmp_path):
    """botocore refuses to sign a request before anything is sent: one line, exit 2 (a real process,
    an environment without any AWS credentials)."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("s3fs")
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(AWS_SHARED_CREDENTIALS_FILE=str(tmp_path / "none"), AWS_CONFIG_FILE=str(tmp_path / "none"),
               AWS_EC2_METADATA_DISABLED="true")
    proc = subprocess.run([sys.executable, "-m", "pipeline", *[a.format(tmp=tmp_path) for a in argv]], env=env,
                          capture_output=True, text=True, timeout=120, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("error: the object store refused access: NoCredentialsError")
    assert not (tmp_path / "run").exists()

"""The Zarr feature store on its own: round trip, resume record, refusal, verify, URLs, bytes."""

from __future__ import annotations

import json

import numpy as np
import pytest
from repro import tree_bytes

from pipeline.cache.store import CacheWriter, PartInit, cache_info, open_cache, verify_cache
from pipeline.cache.targets import Pooling, TargetSpec
from pipeline.cache.testing import split_record, store_plan
from pipeline.core.errors import UserError
from pipeline.core.shards import read_split
from pipeline.core.views import ViewSpec, sample_views

D = 16
SPEC = TargetSpec(100, "mid_block", Pooling.mean, (D,))
FEATURES = f"targets/{SPEC.name}/features"  # a part's features array, relative to the part


@pytest.fixture(scope="module")
def real(fmnist_shards):
    return {"train": read_split(fmnist_shards / "train", limit=200),
            "test": read_split(fmnist_shards / "test", limit=64)}


def _init(ss, k: int, seed: int) -> PartInit:
    n = len(ss.keys)
    views = sample_views(n, k, ViewSpec(), seed)
    seeds = np.random.default_rng(seed).integers(0, 2**63 - 1, size=(n, k), dtype=np.int64)
    fp = ss.fingerprint
    return PartInit(ss.keys, ss.labels, views, seeds, [SPEC], split_record(ss.path, fp))


def _features(init: PartInit, seed: int) -> np.ndarray:
    """Deterministic stand-in features: label-dependent, so the values are not all alike."""
    rng = np.random.default_rng(seed)
    base = rng.normal(size=(10, D))[init.labels]
    return (base[:, None, :] + 0.3 * rng.normal(size=(init.n, init.k, D))).astype(np.float16)


def _inits(real, test_rows: int = 64) -> dict[str, PartInit]:
    test = real["test"]
    test = type(test)(test.keys[:test_rows], test.images[:test_rows], test.labels[:test_rows],
                      test.fingerprint, test.path)
    return {"train": _init(real["train"], 3, 1), "test": _init(test, 1, 2)}


def _plan(real, **fields):
    """The root plan of the stores below (no diffusion model: the features are stand-ins)."""
    return store_plan([SPEC], _inits(real), **fields)


def write_store(url: str, real, *, stop_after: int | None = None, finalize: bool = True,
                nan_row: int | None = None, test_rows: int = 64,
                chunking: tuple[int, int] = (16, 2)) -> tuple[CacheWriter, dict]:
    inits = _inits(real, test_rows)
    feats = {n: _features(p, i) for i, (n, p) in enumerate(inits.items())}
    if nan_row is not None:
        feats["train"][nan_row, 1, 3] = np.nan
    w = CacheWriter.open_or_create(url, plan=store_plan([SPEC], inits), parts=inits, rows_per_chunk=chunking[0],
                                   chunks_per_shard=chunking[1], compressor="blosc-zstd")
    done = 0
    for name in inits:
        for s in w.missing_shards(name):
            if stop_after is not None and done >= stop_after:
                return w, feats
            a, b = w.shard_rows(name, s)
            w.write_shard(name, s, {SPEC.name: feats[name][a:b]})
            done += 1
    if finalize:
        for name in inits:
            w.finalize_part(name)
        w.finalize({"probe": {"probe_accuracy": 0.5}})
    return w, feats


def test_round_trip_and_stats(tmp_path, real):
    url = str(tmp_path / "c.zarr")
    _, feats = write_store(url, real)
    cache = open_cache(url)
    assert cache.parts == ["train", "test"] and cache.default_target == SPEC and cache.attrs["complete"] is True
    part = cache.part("train")
    assert (part.n, part.k, part.d) == (200, 3, D) and part.keys == real["train"].keys
    np.testing.assert_array_equal(part.labels, real["train"].labels)
    rows, views = np.array([5, 199, 5, 0, 37]), np.array([2, 0, 1, 1, 2])
    np.testing.assert_array_equal(part.read(rows, views), feats["train"][rows, views])
    assert part.n_chunks == 13
    np.testing.assert_array_equal(part.read_chunk(12), feats["train"][192:200])
    flat = feats["train"].astype(np.float64).reshape(-1, D)
    np.testing.assert_allclose(part.mean, flat.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(part.std, flat.std(0), rtol=1e-4)
    assert part.mean.dtype == np.float32 and part.views["flip"].dtype == np.uint8
    assert verify_cache(url) == []
    info = cache_info(url)
    assert "N=200 K=3" in info and f"{SPEC.name}" in info and "D=16 float16" in info and "blosc-zstd" in info


def test_progress_record_drives_resume(tmp_path, real):
    url = str(tmp_path / "c.zarr")
    w, _ = write_store(url, real, stop_after=3, finalize=False)
    assert list(w.missing_shards("train")) == [3, 4, 5, 6]
    with pytest.raises(UserError, match="incomplete"):
        open_cache(url)
    shard = tmp_path / "c.zarr" / "train" / "targets" / SPEC.name / "features" / "c" / "1" / "0" / "0"
    data = bytearray(shard.read_bytes())
    data[40] ^= 0xFF
    shard.write_bytes(bytes(data))
    w2 = CacheWriter.open_or_create(url, plan=_plan(real), parts={}, rows_per_chunk=16, chunks_per_shard=2,
                                    compressor="blosc-zstd")
    assert list(w2.missing_shards("train")) == [1, 3, 4, 5, 6]  # the damaged shard is redone


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, real):
    a, b = tmp_path / "a.zarr", tmp_path / "b.zarr"
    write_store(str(a), real)
    write_store(str(b), real, stop_after=4, finalize=False)
    write_store(str(b), real)
    assert tree_bytes(a) == tree_bytes(b)  # every file, metadata included: no timestamps


def test_other_settings_refused(tmp_path, real):
    url = str(tmp_path / "c.zarr")
    write_store(url, real, stop_after=1, finalize=False)
    with pytest.raises(UserError, match="other settings"):
        CacheWriter.open_or_create(url, plan=_plan(real, seed=10), parts={}, rows_per_chunk=16,
                                   chunks_per_shard=2, compressor="blosc-zstd")
    folder = tmp_path / "not-a-store"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(UserError, match="not a feature cache"):
        write_store(str(folder), real)
    assert (folder / "precious.txt").read_text() == "keep me"
    with pytest.raises(UserError, match="not a readable feature cache"):
        open_cache(str(tmp_path / "missing.zarr"))


def _only(problems: list[str], needle: str) -> None:
    assert problems and all(needle in p for p in problems), problems


def test_verify_names_each_problem(tmp_path, real):
    url = tmp_path / "c.zarr"
    write_store(str(url), real)
    shard = url / "train" / "targets" / SPEC.name / "features" / "c" / "2" / "0" / "0"
    original = shard.read_bytes()

    flipped = bytearray(original)
    flipped[len(flipped) // 2] ^= 0x01
    shard.write_bytes(bytes(flipped))
    problems = verify_cache(str(url))
    assert any(f"train/{FEATURES}/c/2/0/0: checksum mismatch" in p for p in problems), problems

    shard.write_bytes(original[: len(original) // 2])
    problems = verify_cache(str(url))
    assert any(f"train/{FEATURES}/c/2/0/0: checksum mismatch" in p for p in problems), problems

    shard.unlink()
    assert any(f"train/{FEATURES}/c/2/0/0: missing file" in p for p in verify_cache(str(url)))
    shard.write_bytes(original)
    assert verify_cache(str(url)) == []

    meta = url / "zarr.json"
    doc = json.loads(meta.read_text())
    del doc["attributes"]["complete"]
    meta.write_text(json.dumps(doc))
    _only(verify_cache(str(url)), "incomplete")
    with pytest.raises(UserError, match="incomplete"):
        open_cache(str(url))


def test_verify_finds_nan(tmp_path, real):
    url = str(tmp_path / "c.zarr")
    write_store(url, real, nan_row=37)
    problems = verify_cache(url)
    assert any(f"train/{FEATURES}/c/1/0/0: 1 NaN/Inf values (rows 37" in p for p in problems), problems
    assert any(f"train/targets/{SPEC.name}/mean: NaN/Inf" in p for p in problems), problems


def test_check_against(tmp_path, real, fmnist_shards):
    url = str(tmp_path / "c.zarr")
    write_store(url, real)
    cache = open_cache(url)
    cache.check_against("train", real["train"], view_spec=ViewSpec().to_dict(), image_size=28)
    with pytest.raises(UserError, match="other data"):
        cache.check_against("train", real["test"])
    with pytest.raises(UserError, match="augmentation spec"):
        cache.check_against("train", real["train"], view_spec=ViewSpec(pad=4).to_dict())
    with pytest.raises(UserError, match="image size"):
        cache.check_against("train", real["train"], image_size=32)
    with pytest.raises(UserError, match="no part 'synthetic'"):
        cache.part("synthetic")


@pytest.mark.parametrize("scheme", ["memory", "file"])
def test_fsspec_urls(tmp_path, real, scheme):
    url = f"memory://{tmp_path.name}/c.zarr" if scheme == "memory" else f"file://{tmp_path}/c.zarr"
    _, feats = write_store(url, real)
    part = open_cache(url).part("test")
    np.testing.assert_array_equal(part.read(np.arange(64), np.zeros(64, int)), feats["test"][:, 0])
    assert verify_cache(url) == []


@pytest.mark.parametrize("test_rows,chunking", [(50, (16, 8)), (5, (16, 2)), (64, (7, 3))])
def test_ragged_sizes(tmp_path, real, test_rows, chunking):
    """Parts smaller than a shard, or than a chunk, or not a multiple of either."""
    url = str(tmp_path / "c.zarr")
    _, feats = write_store(url, real, test_rows=test_rows, chunking=chunking)
    assert verify_cache(url) == []
    cache = open_cache(url)
    for name in ("train", "test"):
        part = cache.part(name)
        got = np.concatenate([part.read_chunk(c) for c in range(part.n_chunks)])
        np.testing.assert_array_equal(got, feats[name])


# --- a cache from a hostile or careless sender -------------------------------------------------
def _edit_json(path, edit) -> None:
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


def _reseal(url) -> None:
    """What a forger who knows the format does after editing root attributes: a fresh digest."""
    from pipeline.cache.store import attrs_digest

    _edit_json(url / "zarr.json", lambda d: d["attributes"].update(digest=attrs_digest(d["attributes"])))


def test_metadata_is_covered_like_data(tmp_path, real):
    """Array metadata (dtype), root attributes (t, model hash) and the manifest itself are checked."""
    from pipeline.cache.store import attrs_digest

    url = tmp_path / "c.zarr"
    write_store(str(url), real)
    digest = open_cache(str(url)).attrs["digest"]
    assert verify_cache(str(url), digest=digest) == [] and len(digest) == 64
    original = {p: p.read_bytes() for p in url.rglob("zarr.json")}

    # float16 -> int16 reads the same bytes as numbers near 14000: the array's zarr.json is in the manifest
    _edit_json(url / "train" / "targets" / SPEC.name / "features" / "zarr.json", lambda d: d.update(data_type="int16"))
    _only(verify_cache(str(url)), f"train/{FEATURES}/zarr.json: checksum mismatch")

    for p, b in original.items():
        p.write_bytes(b)
    _edit_json(url / "zarr.json", lambda d: d["attributes"]["targets"][0].update(t=500))  # a forged timestep
    _only(verify_cache(str(url)), "digest mismatch")
    with pytest.raises(UserError, match="digest mismatch"):
        open_cache(str(url))
    _reseal(url)  # consistent again, but it is another cache: its digest tells, and its spec lies
    with pytest.raises(UserError, match="malformed target specification.*'t': 500"):
        open_cache(str(url))  # the set is named t100-mid_block
    _only(verify_cache(str(url), digest=digest), f"is not the expected {digest}")

    for p, b in original.items():
        p.write_bytes(b)
    _edit_json(url / "zarr.json", lambda d: d["attributes"].update(manifest={}))  # emptied manifest
    _reseal(url)
    problems = verify_cache(str(url))
    assert problems and all("not in the manifest" in p for p in problems)
    assert attrs_digest(json.loads((url / "zarr.json").read_text())["attributes"]) != digest


def test_manifest_names_never_leave_the_store(tmp_path, real):
    """A manifest entry pointing outside the store is only compared with the listing, never read
    (no hash oracle on /etc/hostname); a file that is a symlink to /dev/zero is refused unread."""
    import os

    url = tmp_path / "c.zarr"
    write_store(str(url), real)
    _edit_json(url / "zarr.json", lambda d: d["attributes"]["manifest"].update(
        {"../../../../etc/hostname": "0" * 64, "/etc/hostname": "0" * 64}))
    _reseal(url)
    problems = verify_cache(str(url))
    assert sorted(problems) == ["../../../../etc/hostname: missing file", "/etc/hostname: missing file"]

    write_store(str(tmp_path / "d.zarr"), real)
    shard = tmp_path / "d.zarr" / "train" / "targets" / SPEC.name / "features" / "c" / "2" / "0" / "0"
    shard.unlink()
    os.symlink("/etc/hostname", shard)  # a file outside the store, through a link: refused unread
    _only(verify_cache(str(tmp_path / "d.zarr")), f"train/{FEATURES}/c/2/0/0: not a regular file")
    shard.unlink()
    os.symlink("/dev/zero", shard)  # not even listed as a file: missing, and never read
    _only(verify_cache(str(tmp_path / "d.zarr")), f"train/{FEATURES}/c/2/0/0: missing file")


def test_old_format_refused_with_how_to_rebuild(tmp_path, real):
    url = tmp_path / "c.zarr"
    write_store(str(url), real)
    _edit_json(url / "zarr.json", lambda d: d["attributes"].update(format="dra-feature-cache/1"))
    with pytest.raises(UserError, match=r"format dra-feature-cache/1 is no longer read .*rebuild .*extract"):
        open_cache(str(url))
    _only(verify_cache(str(url)), "no longer read")
    # format 2 (one target set, features directly under each part): refused in one line, not misread
    _edit_json(url / "zarr.json", lambda d: d["attributes"].update(format="dra-feature-cache/2"))
    with pytest.raises(UserError, match=r"format dra-feature-cache/2 is no longer read \(it holds one target set "
                                        r"in another layout\): rebuild the cache with `python -m pipeline extract`"):
        open_cache(str(url))


def _forge(url, edit, key: str = "train/zarr.json") -> None:
    """A sender who edits a metadata file (a part's attributes by default) and rewrites manifest and
    digest to match."""
    import hashlib

    from pipeline.cache.store import attrs_digest

    _edit_json(url / key, (lambda d: edit(d["attributes"])) if key == "train/zarr.json" else edit)
    root = json.loads((url / "zarr.json").read_text())
    a = root["attributes"]
    a["manifest"][key] = hashlib.sha256((url / key).read_bytes()).hexdigest()
    a["digest"] = attrs_digest(a)
    (url / "zarr.json").write_text(json.dumps(root))


@pytest.mark.parametrize("edit", [lambda a: a.update(rows_per_chunk=0), lambda a: a.update(n="200"),
                                  lambda a: a.update(rows_per_shard=7), lambda a: a.pop("k")],
                         ids=["rows-per-chunk-0", "n-a-string", "shard-rows-disagree", "k-missing"])
def test_malformed_part_attributes_are_refused_in_one_line(tmp_path, real, edit):
    url = tmp_path / "c.zarr"
    write_store(str(url), real)
    _forge(url, edit)
    _check_one_line(url)


def _check_one_line(url) -> None:
    problems = verify_cache(str(url))
    assert len(problems) == 1 and problems[0].startswith("train:"), problems
    with pytest.raises(UserError, match="train:"):
        open_cache(str(url)).part("train")


def _claiming_a_billion_rows(tmp_path, real):
    """A store whose train part's array shapes and attributes were rewritten consistently to claim
    10^9 rows, manifest and digest resealed as a forger who knows the format would."""
    import hashlib

    from pipeline.cache.store import attrs_digest

    url = tmp_path / "c.zarr"
    write_store(str(url), real)
    big = 10**9
    for name in (FEATURES, "keys", "labels", "dx", "dy", "flip", "noise_seed"):
        _edit_json(url / "train" / name / "zarr.json", lambda d: d.update(shape=[big, *d["shape"][1:]]))
    _edit_json(url / "train" / "zarr.json", lambda d: d["attributes"].update(n=big))
    root = json.loads((url / "zarr.json").read_text())
    a = root["attributes"]
    for key in list(a["manifest"]):
        if key.endswith("zarr.json"):
            a["manifest"][key] = hashlib.sha256((url / key).read_bytes()).hexdigest()
    a["digest"] = attrs_digest(a)
    (url / "zarr.json").write_text(json.dumps(root))
    return url


def test_a_store_claiming_a_billion_rows_is_refused_before_reading_them(tmp_path, real, fmnist_shards):
    """Array shapes and attributes rewritten consistently (and resealed) to claim 10^9 rows: the join
    compares N with the image shards' count before any per-row array is loaded."""
    import time

    url = _claiming_a_billion_rows(tmp_path, real)
    cache = open_cache(str(url))
    t0 = time.perf_counter()
    with pytest.raises(UserError, match="only 512"):
        cache.check_against("train", read_split(fmnist_shards / "train"))
    assert time.perf_counter() - t0 < 5 and "keys" not in vars(cache.part("train"))  # never loaded


def test_zero_chunks_are_refused_in_one_line(tmp_path, real):
    def zero(d):
        d["chunk_grid"]["configuration"]["chunk_shape"][0] = 0
        d["codecs"][0]["configuration"]["chunk_shape"][0] = 0

    url = tmp_path / "c.zarr"
    write_store(str(url), real)
    _forge(url, zero, key=f"train/{FEATURES}/zarr.json")
    _check_one_line(url)


def test_consolidated_metadata_cannot_bypass_the_digest(tmp_path, real):
    """A sender adds a consolidated_metadata block to the root zarr.json (outside the manifest)
    that retypes the features as int16 and keeps attributes, manifest and digest genuine: zarr would
    read the array metadata from that block. The store is refused by verify (with the genuine
    digest) and by open, and the block is never used even by a raw open."""
    from pipeline.cache.store import open_group

    url = tmp_path / "c.zarr"
    write_store(str(url), real)
    digest = open_cache(str(url)).attrs["digest"]
    meta = json.loads((url / "train" / "targets" / SPEC.name / "features" / "zarr.json").read_text())
    meta["data_type"] = "int16"
    _edit_json(url / "zarr.json", lambda d: d.update(consolidated_metadata={
        "kind": "inline", "must_understand": False, "metadata": {f"train/{FEATURES}": meta}}))
    assert json.loads((url / "zarr.json").read_text())["attributes"]["digest"] == digest  # genuine
    _only(verify_cache(str(url), digest=digest), "consolidated_metadata")
    with pytest.raises(UserError, match="consolidated_metadata"):
        open_cache(str(url))
    assert str(open_group(str(url), "r")[f"train/{FEATURES}"].dtype) == "float16"  # its own file
    _edit_json(url / "zarr.json", lambda d: d.pop("consolidated_metadata"))
    assert verify_cache(str(url), digest=digest) == []  # zarr refuses any other key itself


@pytest.mark.parametrize("value", ["", " ", "0" * 63, "Z" * 64, "A" * 64])
def test_an_empty_or_malformed_digest_is_refused_not_ignored(tmp_path, real, capsys, value):
    from reliability_helpers import assert_one_error_line, run_cli

    url = tmp_path / "c.zarr"
    write_store(str(url), real)
    with pytest.raises(UserError, match="--digest"):
        verify_cache(str(url), digest=value)
    code, out, err = run_cli(capsys, ["cache", "verify", str(url), "--digest", value])
    assert "--digest" in assert_one_error_line(code, err) and code == 2 and "ok" not in out
    digest = open_cache(str(url)).attrs["digest"]
    from pipeline.cli import main

    main(["cache", "verify", str(url), "--digest", digest])  # the genuine one: ok, exit 0
    assert capsys.readouterr().out.strip().endswith(": ok")


def test_verify_refuses_a_store_claiming_more_rows_than_its_files_before_reading_them(tmp_path, real):
    """Shapes and attributes rewritten consistently (and resealed) to claim 10^9 rows: verify counts
    each array's shard files against its grid (extraction writes every shard, empty or not) and
    names the gap, without reading or allocating the claimed rows."""
    import resource
    import time

    url = _claiming_a_billion_rows(tmp_path, real)
    t0, rss0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    problems = verify_cache(str(url))
    assert problems and all("train/" in p and "file(s)" in p for p in problems), problems
    assert time.perf_counter() - t0 < 5
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0 < 200 * 2**10  # KiB: < 200 MiB more

"""Stage `extract` end to end on real Fashion-MNIST with a tiny UNet: contract, recipe, refusals,
determinism, and SIGKILL + resume. The store holds 2 timesteps x 2 layers (4 target sets), so every
property is checked on a multi-target store; the recipe is checked on every set."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from repro import assert_features_close, torch_threads, tree_bytes

from pipeline.cache.config import ExtractConfig
from pipeline.cache.probe import linear_probe
from pipeline.cache.store import open_cache, verify_cache
from pipeline.core.errors import UserError
from pipeline.core.shards import Split, read_split, write_split
from stages import extract

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional UNet (null class 10) saved as a diffusers pipeline folder."""
    out = tmp_path_factory.mktemp("model")
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=28, in_channels=1, out_channels=1, block_out_channels=(8, 16, 16),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 3,
                       up_block_types=("UpBlock2D",) * 3, num_class_embeds=11, norm_num_groups=8)
    unet.save_pretrained(out / "unet")
    DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2").save_pretrained(out / "scheduler")
    return out


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory, fmnist_shards) -> Path:
    """Stand-in synthetic shards: 96 real test images under other keys, as a `train` split."""
    out = tmp_path_factory.mktemp("synthetic")
    test = read_split(fmnist_shards / "test")
    keys = [f"syn-train-{i:07d}" for i in range(96)]
    write_split(out / "train", Split(test.images[-96:], test.labels[-96:], test.fingerprint["classes"]), keys,
                shard_size=50, progress=False)
    return out


def config(model_dir, fmnist_shards, synthetic_dir, out, **kw) -> ExtractConfig:
    base = ExtractConfig(model=str(model_dir), real_splits=str(fmnist_shards), synthetic=str(synthetic_dir),
                         out=str(out), t=(100, 30), layer=("mid_block", "up_blocks.0"), views=3, views_synthetic=2, batch_size=64,
                         rows_per_chunk=32, chunks_per_shard=2, limit=200)
    return replace(base, **kw)


@pytest.fixture(scope="module")
def store(tmp_path_factory, model_dir, fmnist_shards, synthetic_dir) -> Path:
    out = tmp_path_factory.mktemp("extract") / "feats.zarr"
    extract.run(config(model_dir, fmnist_shards, synthetic_dir, out))
    return out


def test_store_follows_the_contract(store, fmnist_shards):
    assert verify_cache(str(store)) == []
    cache = open_cache(str(store))
    a = cache.attrs
    assert cache.parts == ["train", "synthetic", "test"]
    assert (a["timesteps"], a["layers"], a["pooling"], a["draws"], a["condition"]) == \
        ([100, 30], ["mid_block", "up_blocks.0"], "mean", 1, "null")
    assert [s.name for s in cache.targets] == ["t100-mid_block", "t100-up_blocks.0", "t30-mid_block", "t30-up_blocks.0"]
    assert cache.default_target.name == "t100-mid_block" and a["noise"] == "shared-across-timesteps"
    assert cache.target(30).name == "t30-mid_block" and cache.target(layer="up_blocks.0").name == "t100-up_blocks.0"
    assert {s.layer: s.shape for s in cache.targets} == {"mid_block": (16,), "up_blocks.0": (16,)}
    assert a["model"]["num_classes"] == 10 and len(a["model"]["weights_sha256"]) == 64
    assert a["normalisation"] == "x*2-1" and a["view_spec"]["pad"] == 2 and a["complete"] is True
    train = cache.part("train")
    assert (train.n, train.k, train.d) == (200, 3, 16)
    assert (cache.part("synthetic").k, cache.part("test").k) == (2, 1)
    test = cache.part("test")  # the test part's one view is the image itself; train's K views are uniform
    assert (test.views["dx"][:, 0] == 2).all() and (test.views["flip"][:, 0] == 0).all()
    assert not ((train.views["dx"][:, 0] == 2) & (train.views["dy"][:, 0] == 2) & (train.views["flip"][:, 0] == 0)).all()
    assert len(np.unique(train.noise_seed)) == train.noise_seed.size
    ss = read_split(fmnist_shards / "train", limit=200)
    assert train.keys == ss.keys
    cache.check_against("train", read_split(fmnist_shards / "train"))
    probe = a["probe"]
    assert [(r["t"], r["layer"]) for r in probe["sets"]] == [(s.t, s.layer) for s in cache.targets]
    assert all(0.3 < r["probe_accuracy"] <= 1.0 for r in probe["sets"])  # 10 classes: chance is 0.1
    assert probe["probe_accuracy"] == probe["sets"][0]["probe_accuracy"]  # the default set's
    # the probe never sees the test part: fitted on the train part's first 160 rows, scored on its last 40
    assert (probe["n_fit"], probe["n_held_out"]) == (160, 40)
    x = cache.part("train", cache.targets[1]).read(np.arange(200), np.zeros(200, int)).reshape(200, -1)
    assert probe["sets"][1]["probe_accuracy"] == round(
        linear_probe(x[:160], train.labels[:160], x[160:], train.labels[160:]), 6)
    assert [p.name for p in store.parent.iterdir()] == [store.name]  # nothing written beside the store
    f = train.read_chunk(0).astype(np.float32)
    assert np.isfinite(f).all() and f.std() > 0
    assert not np.allclose(f[:, 0], f[:, 1])  # different views give different targets
    sets = {s.name: cache.part("train", s).read_chunk(0).astype(np.float32) for s in cache.targets}
    assert len({v.tobytes() for v in sets.values()}) == 4  # four different target sets


def recompute_row(attrs: dict, target: dict, unet, scheduler, image: np.ndarray, dx: int, dy: int, flip: int,
                  seed: int) -> torch.Tensor:
    """The README recipe for one row of target set ``target`` (an entry of the root ``targets``):
    recorded facts + diffusers + numpy (no pipeline.cache.extractor)."""
    pad, t, draws = attrs["view_spec"]["pad"], target["t"], attrs["draws"]
    h, w = image.shape[:2]
    img = np.pad(image, ((pad, pad), (pad, pad), (0, 0)))[dy:dy + h, dx:dx + w]  # crop of the padded image
    if flip:
        img = img[:, ::-1]
    x0 = torch.tensor(img.copy()).permute(2, 0, 1)[None].float() / 255 * 2 - 1  # [0,1] -> [-1,1]
    noise = torch.randn((draws, *x0.shape[1:]), generator=torch.Generator().manual_seed(seed))
    ts = torch.full((draws,), t, dtype=torch.long)
    x_t = scheduler.add_noise(x0.expand(draws, -1, -1, -1), noise, ts)
    labels = torch.full((draws,), attrs["model"]["null_class"]) if attrs["condition"] == "null" else None
    captured = []
    block = dict(unet.named_modules())[target["layer"]]
    handle = block.register_forward_hook(lambda m, i, o: captured.append(o[0] if isinstance(o, tuple) else o))
    with torch.no_grad():
        unet(x_t, ts, class_labels=labels)
    handle.remove()
    return captured[0].mean(dim=(2, 3)).mean(0)  # pooling "mean", then the mean over draws


def test_recompute_rows_with_diffusers_alone(store):
    """Every target set: the same noise seed at each timestep (the noise is shared across t)."""
    cache = open_cache(str(store))
    a = cache.attrs
    root = Path(cache.model_source)  # recorded relative to the store (a.paths), resolved
    assert a["paths"] == "relative-to-store" and a["model"]["source"].startswith("../")
    unet = UNet2DModel.from_pretrained(root / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(root / "scheduler")
    rng = np.random.default_rng(7)
    for name, target in [(name, target) for name in ("train", "synthetic") for target in a["targets"]]:
        part = cache.part(name, cache.target(target["t"], target["layer"]))
        ss = read_split(part.shards, limit=part.n)
        for n, k in zip(rng.integers(0, part.n, 3), rng.integers(0, part.k, 3)):
            v = {key: int(part.views[key][n, k]) for key in ("dx", "dy", "flip")}
            row = recompute_row(a, target, unet, scheduler, ss.images[n], **v, seed=int(part.noise_seed[n, k]))
            stored = torch.tensor(part.read(np.array([n]), np.array([k]))[0].astype(np.float32))
            cos = torch.nn.functional.cosine_similarity(row, stored, dim=0)
            assert cos >= 0.999, (name, target["name"], n, k, float(cos))
            # raw embeddings share one dominant direction: also compare them centred, which a wrong
            # seed or view fails by far (measured: 0.996 raw but 0.82 centred)
            mean = torch.tensor(part.mean)
            centred = torch.nn.functional.cosine_similarity(row - mean, stored - mean, dim=0)
            assert centred >= 0.995, (name, target["name"], n, k, float(centred))


def test_extractor_from_cache_replays_rows(store):
    """train --online rebuilds the extractor from the attrs and gets the stored rows back (within one
    float16 step: these 8 views form another batch than at extraction, see repro.py)."""
    from pipeline.cache.extractor import FeatureExtractor
    from pipeline.core.views import apply_views

    cache = open_cache(str(store))
    target = cache.target(30, "up_blocks.0")
    fe = FeatureExtractor.from_cache(cache, target)
    part = cache.part("train", target)
    ss = read_split(part.shards, limit=part.n)
    rows, views = np.arange(0, 200, 25), np.arange(8) % 3
    x = torch.from_numpy(ss.images[rows]).permute(0, 3, 1, 2).float() / 255
    x = apply_views(x, *(torch.from_numpy(part.views[k][rows, views]) for k in ("dx", "dy", "flip")), 2)
    got = fe(x, torch.from_numpy(part.noise_seed[rows, views]), torch.from_numpy(part.labels[rows]))
    assert_features_close(got.numpy().astype(np.float16), part.read(rows, views))


def test_refused_before_any_work(tmp_path, model_dir, fmnist_shards, synthetic_dir):
    out = tmp_path / "feats.zarr"
    cases = {"outside the schedule": dict(t=1000), "unknown layer 'mid'": dict(layer="mid"),
             "--views must be a count >= 1 or .all.": dict(views=0), "--rows-per-chunk": dict(rows_per_chunk=0),
             "--pooling .max.: choose one of": dict(pooling="max"), "--condition .cfg.: choose one": dict(condition="cfg"),
             "no fingerprint.json": dict(real_splits=str(tmp_path / "nowhere")),
             r"--limit must be 0 \(all\) or >= 10": dict(limit=-1), "unknown compressor": dict(compressor="gzip9"),
             "--t must be one timestep >= 0 or a comma list of distinct": dict(t="100,100"),
             "--t must be one value or a comma list of integers": dict(t="1e2"),
             "--t must be one timestep >= 0": dict(t=-5), "--layer must be one value or a comma list": dict(layer="a,,b"),
             "--layer must be one block or a comma list of distinct": dict(layer="mid_block,mid_block"),
             "t=2000 is outside the schedule": dict(t="100,2000"), "unknown layer 'up'": dict(layer="mid_block,up")}
    for message, kw in cases.items():
        with pytest.raises(UserError, match=message):
            extract.run(config(model_dir, fmnist_shards, synthetic_dir, out, **kw))
        assert not out.exists(), message
    with pytest.raises(UserError, match="mid_block, conv_norm_out"):  # the valid names are listed
        extract.run(config(model_dir, fmnist_shards, synthetic_dir, out, layer="nope"))


def test_cli_one_line_error(tmp_path, model_dir, fmnist_shards):
    proc = subprocess.run([sys.executable, "-m", "pipeline", "extract", "--model", str(model_dir),
                           "--real-splits", str(fmnist_shards), "--synthetic", "", "--out", str(tmp_path / "f.zarr"),
                           "--t", "5000"], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: timestep t=5000 is outside")


def test_same_store_twice_byte_for_byte(tmp_path, store, model_dir, fmnist_shards, synthetic_dir):
    again = tmp_path / "feats.zarr"
    extract.run(config(model_dir, fmnist_shards, synthetic_dir, again))
    assert tree_bytes(again) == tree_bytes(store)
    result = extract.run(config(model_dir, fmnist_shards, synthetic_dir, again))  # complete: nothing to do
    assert sum(result["written"].values()) == 0 and tree_bytes(again) == tree_bytes(store)


def _recorded(store: Path) -> list[Path]:
    """Progress chunks present: one per (part, target set, shard) written."""
    return list(store.glob("*/targets/*/progress/c/*/0"))


def _shards_done(store: Path, n_sets: int = 4) -> int:
    """(part, shard) pairs written in every target set (a kill can land between two sets' writes)."""
    seen: dict[tuple[str, str], int] = {}
    for p in _recorded(store):
        key = (p.relative_to(store).parts[0], p.parts[-2])
        seen[key] = seen.get(key, 0) + 1
    return sum(count == n_sets for count in seen.values())


def _kill_when(cmd: list[str], store: Path, shards_done: int) -> None:
    """Start the CLI, SIGKILL it once `shards_done` feature shards of some target set are recorded
    (with 4 sets a kill often lands between the sets of one shard: resume computes only those lacking)."""
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while proc.poll() is None and time.time() < deadline:
            if len(_recorded(store)) >= shards_done:
                break
            time.sleep(0.01)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def _cli(cfg: ExtractConfig) -> list[str]:
    return [sys.executable, "-m", "pipeline", "extract", "--model", cfg.model, "--real-splits", cfg.real_splits,
            "--synthetic", cfg.synthetic, "--out", cfg.out, "--views", str(cfg.views),
            "--views-synthetic", str(cfg.views_synthetic), "--batch-size", str(cfg.batch_size),
            "--t", ",".join(map(str, cfg.t)), "--layer", ",".join(cfg.layer), "--rows-per-chunk", str(cfg.rows_per_chunk), "--chunks-per-shard", str(cfg.chunks_per_shard),
            "--limit", str(cfg.limit)]


@pytest.mark.parametrize("kill_after", [2, pytest.param(0, marks=pytest.mark.slow),
                                        pytest.param(6, marks=pytest.mark.slow)])
def test_sigkill_then_rerun_equals_uninterrupted(tmp_path, store, model_dir, fmnist_shards, synthetic_dir,
                                                 kill_after):
    """Byte-equal to the in-process store: same processor, threads (the child inherits the suite's
    OMP_NUM_THREADS) and batches."""
    out = tmp_path / "feats.zarr"
    cfg = config(model_dir, fmnist_shards, synthetic_dir, out)
    _kill_when(_cli(cfg), out, kill_after)
    with pytest.raises(UserError):
        open_cache(str(out))  # killed: no "complete" marker (or no store at all)
    done_before = _shards_done(out)
    proc = subprocess.run(_cli(cfg), cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    total = 4 + 2 + 4  # shards of 64 rows: train 200, synthetic 96, test 200
    assert f"computing {total - done_before} of {total} shards" in proc.stdout
    assert tree_bytes(out) == tree_bytes(store)


def test_two_processes_equal_one(tmp_path, store, model_dir, fmnist_shards, synthetic_dir):
    """accelerate launch, 2 CPU processes at 1 torch thread each: each owns whole zarr shards.

    Depends on: the processor and the threads per process (batches are formed per shard, so they are
    the same). Against one process at 1 thread the store is byte-equal; against the suite's
    threads the features are equal within one float16 step and everything else exactly (repro.py).
    """
    from launch import accelerate_launch

    one, two = tmp_path / "one.zarr", tmp_path / "two.zarr"
    with torch_threads(1):
        extract.run(config(model_dir, fmnist_shards, synthetic_dir, one))
    proc = accelerate_launch(_cli(config(model_dir, fmnist_shards, synthetic_dir, two))[3:], timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert tree_bytes(two) == tree_bytes(one)
    a, b = open_cache(str(two)), open_cache(str(store))
    assert a.parts == b.parts == ["train", "synthetic", "test"]
    for name in a.parts:
        for target in a.targets:
            p, q = a.part(name, target), b.part(name, target)
            assert p.keys == q.keys and np.array_equal(p.labels, q.labels)
            assert np.array_equal(p.noise_seed, q.noise_seed)
            assert all(np.array_equal(p.views[v], q.views[v]) for v in ("dx", "dy", "flip"))
            assert_features_close(np.concatenate([p.read_chunk(c) for c in range(p.n_chunks)]),
                                  np.concatenate([q.read_chunk(c) for c in range(q.n_chunks)]))


def test_extractor_computes_in_float32_under_autocast(store):
    """train --online runs inside the step's autocast (bf16 on GPUs): the targets must not change."""
    from pipeline.cache.extractor import FeatureExtractor

    cache = open_cache(str(store))
    fe = FeatureExtractor.from_cache(cache, cache.default_target)
    x, seeds = torch.rand(6, 1, 28, 28, generator=torch.Generator().manual_seed(0)), torch.arange(6)
    plain = fe(x, seeds, None)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        inside = fe(x, seeds, None)
        bf16 = fe.unet(x, 100, class_labels=torch.full((6,), 10)).sample  # what autocast would do
    assert inside.dtype == torch.float32 and torch.equal(inside, plain)
    assert bf16.dtype == torch.bfloat16


def test_resume_refuses_other_images_under_the_same_keys(tmp_path, store, model_dir, fmnist_shards, synthetic_dir):
    """The plan names each part's content hash: a store is never finished (or called done) on other data."""
    other = tmp_path / "syn"
    syn = read_split(synthetic_dir / "train")
    write_split(other / "train", Split(255 - syn.images, syn.labels, syn.fingerprint["classes"]), syn.keys,
                shard_size=50, progress=False)  # same keys and count, other pixels
    out = tmp_path / "feats.zarr"
    shutil.copytree(store, out)
    with pytest.raises(UserError, match="other settings"):
        extract.run(config(model_dir, fmnist_shards, other, out))
    assert tree_bytes(out) == tree_bytes(store)


@pytest.mark.parametrize("spelling", ["path", "file-url"])
def test_one_writer_per_store_and_a_dead_writer_does_not_block(tmp_path, model_dir, fmnist_shards, synthetic_dir,
                                                               spelling):
    """A second extract on a store another live process writes is refused in one line; the lock is
    the kernel's (flock), so once its holder is killed the next run proceeds. A ``file://`` URL is
    the same local folder and takes the same lock."""
    out = tmp_path / "feats.zarr"
    given = out if spelling == "path" else f"file://{out}"
    holder = subprocess.Popen([sys.executable, "-c", (
        "import fcntl, sys, time; fh = open(sys.argv[1], 'a'); fcntl.flock(fh, fcntl.LOCK_EX); "
        "print('held', flush=True); time.sleep(60)"), f"{out}.lock"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(UserError, match="being written by another live process"):
            extract.run(config(model_dir, fmnist_shards, synthetic_dir, given, limit=64))
        assert not out.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    extract.run(config(model_dir, fmnist_shards, synthetic_dir, given, limit=64))  # the dead holder's lock is gone
    assert verify_cache(str(out)) == []


def test_views_all_stores_every_distinct_view_and_passes_the_recompute(tmp_path, model_dir, fmnist_shards,
                                                                       synthetic_dir):
    """--views all at pad 1 (18 views): every row holds each (dx, dy, flip) once, the identity
    first (the probe's view), and random rows pass the diffusers-only recipe."""
    from pipeline.core.views import ViewSpec

    spec = ViewSpec(pad=1)
    out = tmp_path / "all.zarr"
    extract.run(config(model_dir, fmnist_shards, synthetic_dir, out, views="all", view=spec, synthetic="",
                       limit=24, t="100", layer="mid_block"))
    cache = open_cache(str(out))
    part = cache.part("train")
    assert part.k == spec.n_views == 18 and part.record.view_mode == "all"
    combos = {tuple(int(part.views[key][n, k]) for key in ("dx", "dy", "flip")) for n in (0, 23) for k in range(18)}
    assert len(combos) == 18  # every distinct view, in each row
    assert [int(part.views[key][5, 0]) for key in ("dx", "dy", "flip")] == [1, 1, 0]  # view 0: the identity
    a = cache.attrs
    unet = UNet2DModel.from_pretrained(Path(cache.model_source) / "unet").eval()
    scheduler = DDPMScheduler.from_pretrained(Path(cache.model_source) / "scheduler")
    ss = read_split(part.shards, limit=part.n)
    for n, k in ((3, 17), (20, 9), (11, 0)):
        v = {key: int(part.views[key][n, k]) for key in ("dx", "dy", "flip")}
        row = recompute_row(a, a["targets"][0], unet, scheduler, ss.images[n], **v, seed=int(part.noise_seed[n, k]))
        stored = torch.tensor(part.read(np.array([n]), np.array([k]))[0].astype(np.float32))
        mean = torch.tensor(part.mean)
        assert torch.nn.functional.cosine_similarity(row - mean, stored - mean, dim=0) >= 0.995, (n, k)
    with pytest.raises(UserError, match="count >= 1 or 'all'"):
        config(model_dir, fmnist_shards, synthetic_dir, out, views="some").validate()


def test_a_shard_lost_in_writing_never_leaves_a_complete_store(tmp_path, model_dir, fmnist_shards, synthetic_dir,
                                                                monkeypatch):
    """Before finalising, rank 0 checks every shard of every set is there (another rank's write may
    have failed): a lost write leaves an incomplete store that the next run completes."""
    from pipeline.cache.store import CacheWriter

    out = tmp_path / "feats.zarr"
    real_write = CacheWriter.write_shard

    def lossy(self, part, s, blocks):
        if (part, s) != ("train", 1):  # this one "fails" silently, as a helper rank's could
            real_write(self, part, s, blocks)

    monkeypatch.setattr(CacheWriter, "write_shard", lossy)
    with pytest.raises(UserError, match=r"shards still missing after extraction \({'train': {1: "):
        extract.run(config(model_dir, fmnist_shards, synthetic_dir, out, limit=128, t="100", layer="mid_block"))
    assert json.loads((out / "zarr.json").read_text())["attributes"].get("complete") is not True
    monkeypatch.setattr(CacheWriter, "write_shard", real_write)
    extract.run(config(model_dir, fmnist_shards, synthetic_dir, out, limit=128, t="100", layer="mid_block"))
    assert verify_cache(str(out)) == []


def test_nothing_beside_the_store_and_cache_probe_never_overwrites_a_foreign_file(tmp_path, model_dir, fmnist_shards,
                                                                                 capsys):
    """Two stores in one folder: extract writes nothing beside them; `cache probe STORE --out FILE`
    writes each store's probe (its attributes, with the digest), replaces its own file, and refuses
    a user's file, which stays as it was."""
    from reliability_helpers import assert_one_error_line, run_cli

    from pipeline.cli import main

    common = dict(synthetic="", limit=24, t="100", layer="mid_block", views=2)
    for name in ("a.zarr", "b.zarr"):
        extract.run(config(model_dir, fmnist_shards, "", tmp_path / name, **common))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.zarr", "b.zarr"]
    for name in ("a.zarr", "b.zarr"):
        attrs = open_cache(str(tmp_path / name)).attrs
        for _ in range(2):  # the second run replaces its own file
            main(["cache", "probe", str(tmp_path / name), "--out", str(tmp_path / "m" / f"{name}.json")])
            assert "t \\ layer" in capsys.readouterr().out
        probe = json.loads((tmp_path / "m" / f"{name}.json").read_text())
        assert probe == {"store": str(tmp_path / name), "digest": attrs["digest"], **attrs["probe"],
                             "diagnostics": attrs["diagnostics"]}
    mine = tmp_path / "notes.json"
    mine.write_text("a user's notes\n")
    code, _, err = run_cli(capsys, ["cache", "probe", tmp_path / "a.zarr", "--out", mine])
    assert "is not a probe file" in assert_one_error_line(code, err)
    assert mine.read_text() == "a user's notes\n"


@pytest.mark.parametrize("flags,words", [
    (["--limit", "2"], "--limit must be 0 (all) or >= 10"),
    (["--draws", "1000000000"], "--draws must be <= 64"),
    (["--views", "1000000000"], "only 50 distinct views"),
    (["--views-synthetic", "1000000000"], "only 50 distinct views"),
], ids=["limit-2", "draws-1e9", "views-1e9", "views-synthetic-1e9"])
def test_sizes_that_would_die_late_or_allocate_tib_are_refused_first(tmp_path, model_dir, fmnist_shards, capsys,
                                                                     flags, words):
    from reliability_helpers import assert_one_error_line, run_cli

    code, _, err = run_cli(capsys, ["extract", "--model", model_dir, "--real-splits", fmnist_shards, "--synthetic", "",
                                    "--out", tmp_path / "x.zarr", *flags])
    assert words in assert_one_error_line(code, err) and not (tmp_path / "x.zarr").exists()


def test_k_views_are_drawn_uniformly_unless_identity_first_is_asked_for(store, fmnist_shards):
    """The default (uniform): K distinct views per row, the identity only by chance, recorded in the
    part (``view_draw``); --view-draw identity-first keeps view 0 the identity, as older stores have it."""
    from pipeline.cache.build import part_init
    from pipeline.cache.config import ExtractConfig, ViewDraw
    from pipeline.cache.targets import Pooling, TargetSpec

    part = open_cache(str(store)).part("train")
    ident = lambda v, j: (v["dx"][:, j] == part.view_spec.pad) & (v["dy"][:, j] == part.view_spec.pad) & (v["flip"][:, j] == 0)  # noqa: E731
    assert part.record.view_mode == "uniform" and part.k >= 2
    assert ident(part.views, 0).mean() < 0.5  # 1/n_views expected; a forced identity would give 1
    ss = read_split(fmnist_shards / "train", limit=300)
    spec = [TargetSpec(100, "mid_block", Pooling.mean, (8,))]
    for draw, forced in ((ViewDraw.uniform, False), (ViewDraw.identity_first, True)):
        init = part_init("train", ss, "4", spec, ExtractConfig(view_draw=draw))
        assert bool(ident(init.views, 0).all()) is forced
        assert ("view_draw" in init.record.to_attrs()) is (draw is ViewDraw.uniform)


def test_the_synthetic_part_has_its_own_limit(tmp_path, model_dir, fmnist_shards, synthetic_dir):
    """--synthetic-limit: the first N generated rows whatever --limit is (0: all of them; -1, the
    default: --limit's), and the real parts are the ones --limit gives."""
    many = tmp_path / "many.zarr"
    extract.run(config(model_dir, fmnist_shards, synthetic_dir, many, limit=64, synthetic_limit=0, t=(100,),
                       layer=("mid_block",)))
    cache = open_cache(str(many))
    assert (cache.part("train").n, cache.part("synthetic").n) == (64, 96)
    for limit, n in ((-1, 64), (40, 40)):
        out = tmp_path / f"limit{limit}.zarr"
        extract.run(config(model_dir, fmnist_shards, synthetic_dir, out, limit=64, synthetic_limit=limit, t=(100,),
                           layer=("mid_block",)))
        part = open_cache(str(out)).part("synthetic")
        assert part.n == n and list(part.keys[:n]) == list(cache.part("synthetic").keys[:n])
    with pytest.raises(UserError, match="--synthetic-limit must be -1"):
        ExtractConfig(synthetic_limit=-2).validate()

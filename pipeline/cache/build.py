"""The library behind stage `extract` (its recipe: stages/extract.py): the parts to embed, their
recorded views and noise seeds, the rows of one zarr shard (every target set that lacks it), the
linear probe of every target set."""

from __future__ import annotations

import contextlib
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

import pipeline
from pipeline.cache.config import MIN_ROWS, ExtractConfig, ViewDraw
from pipeline.cache.contract import CachePlan, Fingerprint, ModelRecord, PartRecord
from pipeline.cache.diagnostics import MAX_ROWS, diagnose, diagnosis_lines
from pipeline.cache.extractor import FeatureExtractor
from pipeline.cache.probe import linear_probe
from pipeline.cache.store import IMAGES, CacheWriter, PartInit, probe_table, record_path
from pipeline.cache.targets import TargetSpec
from pipeline.core import storage
from pipeline.core.errors import UserError, check_out
from pipeline.core.runtime import Dist
from pipeline.core.shards import ShardSet, join, read_fingerprint, split_exists
from pipeline.core.streamed import SplitRows
from pipeline.core.views import all_views, apply_view_reference, apply_views, sample_views, to_float01
from pipeline.diffusion.model import load_model, model_files

BUNDLED_MODEL = "model"  # the folder of a store that holds its diffusion model (extract --bundle-model)

PART_IDS = {"train": 0, "synthetic": 1, "test": 2}


def check_config(cfg: ExtractConfig) -> None:
    """Flags and --out; nothing is written outside --out (the probe goes into the store's attributes:
    ``cache probe STORE --out FILE`` writes it where a user or DVC wants it)."""
    cfg.validate()
    check_out(cfg.out, folder=True, urls=True)


def split_dirs(cfg: ExtractConfig) -> dict[str, str]:
    """Part name -> shard folder (path or URL); checks each has a fingerprint (a complete shard set)."""
    dirs = {"train": join(cfg.real_splits, "train"), "test": join(cfg.real_splits, "test")}
    if cfg.synthetic:
        dirs["synthetic"] = cfg.synthetic if split_exists(cfg.synthetic) else join(cfg.synthetic, "train")
    for d in dirs.values():
        read_fingerprint(d)
    return {p: dirs[p] for p in PART_IDS if p in dirs}


def part_init(name: str, ss: ShardSet | SplitRows, mode: str, targets: list[TargetSpec], cfg: ExtractConfig) -> PartInit:
    """Views and noise seeds of one part, from generators seeded with (seed, part). ``views``: a
    count K of random views, or "all" (every distinct view, in ``all_views``' order)."""
    n, k = len(ss.keys), cfg.k_of(mode)
    view_seed = int(np.random.SeedSequence([cfg.seed, PART_IDS[name]]).generate_state(1)[0])
    uniform = cfg.view_draw is ViewDraw.uniform and name != "test"  # test images: their one view is the identity
    views = all_views(n, cfg.view) if mode == "all" else sample_views(n, k, cfg.view, view_seed, identity_first=not uniform)
    rng = np.random.default_rng([cfg.seed, PART_IDS[name], 1])
    noise_seed = rng.integers(0, 2**63 - 1, size=(n, k), dtype=np.int64)
    fp = Fingerprint.of_split(ss.fingerprint)
    record = PartRecord(record_path(cfg.out, ss.path), fp, view_seed,
                        "all" if mode == "all" else cfg.view_draw.value if uniform else None)
    # the test part is never trained on: its images stay in the shards only
    image_shape = fp.image_shape if cfg.images and name != "test" else None
    return PartInit(ss.keys, ss.labels, views, noise_seed, targets, record, image_shape)


def compute_rows(extractor: FeatureExtractor, images: np.ndarray, init: PartInit, a: int, b: int,
                 pad: int, batch_size: int, bar: tqdm) -> dict[str, np.ndarray]:
    """Target set name -> (b-a, K, *shape) float16 features of rows a..b (``images``: those rows'
    images), for every (t, layer) of ``extractor``, batched over the flattened (row, view) pairs."""
    k = init.k
    specs = {(s.t, s.layer): s for s in init.targets}
    out = {specs[key].name: np.empty((b - a, k, *specs[key].shape), np.float16) for key in extractor.sets}
    flat = np.arange(a * k, b * k)
    dev = extractor.device
    for i in range(0, len(flat), batch_size):
        f = flat[i:i + batch_size]
        rows, views = f // k, f % k
        x = to_float01(torch.from_numpy(images[rows - a]).to(dev))
        x = apply_views(x, *(torch.from_numpy(init.views[n][rows, views]) for n in ("dx", "dy", "flip")), pad)
        seeds = torch.from_numpy(init.noise_seed[rows, views])
        labels = torch.from_numpy(init.labels[rows])
        for key, feats in extractor.embed(x, seeds, labels).items():
            out[specs[key].name][rows - a, views] = feats.cpu().numpy().astype(np.float16)
        bar.update(len(f) * len(extractor.timesteps))
    return out


PROBE_ROWS = 50_000  # the probe's rows (the first ones of the train part): its memory stays bounded


def compute_probe(writer: CacheWriter, inits: dict[str, PartInit]) -> dict:
    """A linear probe on the identity view of every target set, fitted on the first 80% of the train
    part's first ``PROBE_ROWS`` rows and scored on the other 20%: the cheap proxy for choosing t and
    layer, so it never looks at the test set. ``probe_accuracy``, ``t`` and ``layer`` are the default set's."""
    targets, train = inits["train"].targets, inits["train"]
    n = min(train.n, PROBE_ROWS)
    n_fit = n * 4 // 5
    if n_fit < 1 or n_fit == n:
        raise UserError(f"the train part has {train.n} image(s): the probe needs at least 2 (fit and held out)")
    labels = np.asarray(train.labels[:n])
    sets = []
    for s in targets:
        x = writer.read_identity("train", s.name, np.arange(n))
        acc = linear_probe(x[:n_fit], labels[:n_fit], x[n_fit:], labels[n_fit:])
        sets.append({"t": s.t, "layer": s.layer, "probe_accuracy": round(acc, 6)})
    probe = {"probe_accuracy": sets[0]["probe_accuracy"], "t": targets[0].t, "layer": targets[0].layer,
             "split": "train part: fit on rows [0, n_fit), accuracy on rows [n_fit, n)" if n == train.n else
             f"train part's first {n} rows: fit on rows [0, n_fit), accuracy on rows [n_fit, {n})",
             "n_fit": n_fit, "n_held_out": n - n_fit, "sets": sets}
    return probe


def compute_diagnostics(writer: CacheWriter, train: PartInit, images: SplitRows | np.ndarray, pad: int, seed: int) -> dict:
    """Each target set's information figures (pipeline/cache/diagnostics.py) on view 0 of at most
    ``MAX_ROWS`` train rows drawn with the extraction's seed, with the pixels of exactly that view."""
    rng = np.random.default_rng([seed, 7])
    rows = np.sort(rng.choice(train.n, min(train.n, MAX_ROWS), replace=False))
    pixels = images[rows] if isinstance(images, np.ndarray) else images.take(rows)  # the part's, or its split's
    views = np.stack([apply_view_reference(pixels[i], int(train.views["dx"][r, 0]), int(train.views["dy"][r, 0]),
                                           int(train.views["flip"][r, 0]), pad) for i, r in enumerate(rows)])
    # float32 holds every float16 exactly at half float64's memory: all sets at once for the pairs
    sets = {s.name: writer.read_identity("train", s.name, rows).astype(np.float32) for s in train.targets}
    try:
        return diagnose(sets, views)
    except ValueError as e:  # e.g. fewer than 2 rows with finite values: the store is still written
        return {"rows": int(len(rows)), "error": str(e)}


def extract(cfg: ExtractConfig) -> dict:
    """The whole stage: checks, one writer per store, every missing shard, statistics, probe, manifest."""
    check_config(cfg)
    dist = Dist()
    # one writer per store: rank 0 holds OUT.lock for the whole run (the other ranks are its helpers)
    with storage.writer_lock(cfg.out) if dist.is_main else contextlib.nullcontext():
        return _extract(cfg, dist)


def _extract(cfg: ExtractConfig, dist: Dist) -> dict:
    dirs = split_dirs(cfg)
    model = load_model(cfg.model, device=str(dist.device))
    extractor = FeatureExtractor(model, t=cfg.t, layer=cfg.layer, pooling=cfg.pooling, draws=cfg.draws,
                                 condition=cfg.condition)
    want_shape = [model.image_size, model.image_size, model.in_channels]
    for path in dirs.values():
        shape = read_fingerprint(path)["image_shape"]
        if shape != want_shape:
            raise UserError(f"{path}: images {shape} but the model takes {want_shape}")
    n_train = read_fingerprint(dirs["train"])["count"]
    if min(n_train, cfg.limit or n_train) < MIN_ROWS:
        raise UserError(f"{dirs['train']}: {n_train} image(s); the linear probe needs a train part of at least "
                        f"{MIN_ROWS} (fit on 80%, scored on the rest)")
    targets = extractor.target_specs(model.image_size, model.in_channels)
    ks = {"train": cfg.views, "synthetic": cfg.views_synthetic, "test": "1"}
    inits, images = {}, {}  # images: each part's rows, read shard by shard as they are needed
    for name, path in dirs.items():
        limit = cfg.synthetic_limit if name == "synthetic" and cfg.synthetic_limit >= 0 else cfg.limit
        images[name] = SplitRows(path, limit=limit)
        inits[name] = part_init(name, images[name], ks[name], targets, cfg)
    # paths relative to the store (a store moved with its inputs still finds them); a hub id as it is
    source = record_path(cfg.out, cfg.model) if Path(cfg.model).expanduser().exists() else str(cfg.model)
    bundle = model_files(cfg.model, model) if cfg.bundle_model else {}  # refused before anything is written
    record = ModelRecord(f"./{BUNDLED_MODEL}" if bundle else source, model.weights_sha256, model.num_classes,
                         model.null_class, source if bundle else None)
    plan = CachePlan(record, tuple(targets), model.image_size, model.in_channels, cfg.view, extractor.pooling,
                     extractor.draws, extractor.condition.value, cfg.seed, pipeline.__version__, cfg.compressor,
                     cfg.images, {n: p.plan for n, p in inits.items()})
    open_args = dict(plan=plan, parts=inits, rows_per_chunk=cfg.rows_per_chunk,
                     chunks_per_shard=cfg.chunks_per_shard, compressor=cfg.compressor)
    writer = CacheWriter.open_or_create(cfg.out, **open_args) if dist.rank == 0 else None
    dist.barrier()
    writer = writer or CacheWriter.open_or_create(cfg.out, create=False, **open_args)
    missing = {n: writer.missing_shards(n) for n in inits}  # part -> shard -> target sets lacking it
    dist.barrier()  # every rank has the same plan before any rank writes (a write would change it)
    # round-robin over all (part, shard) pairs, so small parts do not all land on rank 0
    pairs = [(n, s) for n, shards in missing.items() for s in shards]
    todo = {n: [s for i, (m, s) in enumerate(pairs) if m == n and i % dist.world == dist.rank] for n in missing}
    extractors = {tuple(extractor.sets): extractor}  # one per combination of sets a shard lacks
    by_name = {s.name: s for s in targets}

    def extractor_for(names: list[str]) -> FeatureExtractor | None:
        """Every timestep and layer some lacking set needs (a shard lacks all sets but when resumed);
        None when the shard lacks only its images."""
        names = [n for n in names if n != IMAGES]
        if not names:
            return None
        ts = [t for t in extractor.timesteps if any(by_name[n].t == t for n in names)]
        layers = [x for x in extractor.layers if any(by_name[n].layer == x for n in names)]
        key = tuple((t, x) for t in ts for x in layers)
        if key not in extractors:
            extractors[key] = FeatureExtractor(model, t=ts, layer=layers, pooling=cfg.pooling, draws=cfg.draws,
                                               condition=cfg.condition)
        return extractors[key]

    total = sum((writer.shard_rows(n, s)[1] - writer.shard_rows(n, s)[0]) * inits[n].k
                * len(getattr(extractor_for(missing[n][s]), "timesteps", [])) for n, ss in todo.items() for s in ss)
    if dist.rank == 0:
        print(f"{cfg.out}: computing {sum(map(len, missing.values()))} of "
              f"{sum(writer.n_shards(n) for n in inits)} shards of {len(targets)} target set(s) "
              "(the others are written and checked)")
    bar = tqdm(total=total, desc=f"extract t={','.join(map(str, cfg.t))} {','.join(cfg.layer)}", unit="forward", mininterval=2,
               disable=dist.rank != 0)
    with ThreadPoolExecutor(max_workers=1) as pool:
        pending: Future | None = None
        for name, shards in todo.items():
            for s in shards:
                a, b = writer.shard_rows(name, s)
                ex = extractor_for(missing[name][s])
                pixels = images[name].images(a, b)
                blocks = {} if ex is None else compute_rows(ex, pixels, inits[name], a, b, cfg.view.pad,
                                                            cfg.batch_size, bar)
                blocks = {n: block for n, block in blocks.items() if n in missing[name][s]}
                if IMAGES in missing[name][s]:
                    blocks[IMAGES] = pixels
                if pending is not None:
                    pending.result()  # at most one shard in flight; re-raises write errors
                pending = pool.submit(writer.write_shard, name, s, blocks)
        if pending is not None:
            pending.result()
    bar.close()
    dist.barrier()
    result = {"out": cfg.out, "written": {n: len(s) for n, s in todo.items()}}
    # every rank checks (so none waits at a barrier for a rank that gave up): a write that failed
    # on any rank must never leave a store that looks complete
    left = {n: m for n in inits if (m := writer.missing_shards(n, rehash=False))}
    if left:
        raise UserError(f"{cfg.out}: shards still missing after extraction ({left}); run extract again to resume")
    if dist.rank == 0:
        for name in inits:
            writer.finalize_part(name)
        probe = compute_probe(writer, inits)
        diagnostics = compute_diagnostics(writer, inits["train"], images["train"], cfg.view.pad, cfg.seed)
        for rel, data in bundle.items():  # before the manifest: it lists (and so vouches for) them
            storage.write_bytes(join(cfg.out, BUNDLED_MODEL, rel), data)
        writer.finalize({"probe": probe, "diagnostics": diagnostics})
        result |= {"probe": probe, "diagnostics": diagnostics}
        print(f"{cfg.out}: {', '.join(f'{n} {p.n}x{p.k}' for n, p in inits.items())} (rows x views) x "
              f"{len(targets)} target set(s) ({', '.join(s.name for s in targets)}); linear probe:")
        print("\n".join(probe_table(probe) + diagnosis_lines(diagnostics)))
    dist.barrier()
    return result

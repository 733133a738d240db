"""Stage `generate`: a diffusion model -> labelled synthetic images as webdataset shards.

Output folder (a path or fsspec URL; written as OUT.tmp and renamed locally, so OUT is complete or
absent; on a URL, generate.json is written last and marks it complete)::

    OUT/train/       shards + fingerprint.json, same schema as `prepare` (keys syn-train-NNNNNNN)
    OUT/grid.png     samples per class, one row per class
    OUT/generate.json  settings, timings, and the label check (agreement, classifier test accuracy)

Every output shard is a pure function of (model, settings, seed, shard index), so the work splits
by whole shards: under ``accelerate launch`` process r generates and writes the shards s with
s % world == r, rank 0 then checks them all (sha256 and the content hash, streamed shard by shard)
and writes the fingerprint, grid and report. The result equals a single-process run. Each process
holds one shard of images at a time.

Labels: a class-conditional model gets class-balanced labels (sample i has label i mod K). An
unconditional model's samples are labelled by a standard classifier trained on the real shards
(by rank 0, sent to the others), keeping those with softmax confidence >= ``min_confidence``:
shard s draws candidates from its own index range [s * shard_size * 20, ...) until it is full,
so it still depends on nothing but its index; at most 20 candidates per kept sample.

Check ("agreement"): a standard classifier trained on the real data labels the generated images;
the share that it assigns to the intended class says the samples are recognisable per class.
For an unconditional model the labels are that classifier's, so only its test accuracy is told.

GPU setting (a 32 px CIFAR model): ``--n 1000000 --batch-size 1000 --sampler dpm --sample-steps
25 --guidance 1.5 --shard-size 50000``.
"""


from __future__ import annotations

import time

import numpy as np
from tqdm import tqdm

from pipeline.core import storage
from pipeline.core.errors import UserError
from pipeline.core.runtime import Dist
from pipeline.core.shards import (
    make_keys,
    write_shard,
)
from pipeline.diffusion.model import load_model
from pipeline.generate.config import Filter, GenerateConfig
from pipeline.generate.sampling import make_sampler
from pipeline.generate.synthesis import (
    KEY_PREFIX,
    SIGNATURE,
    check,
    class_names,
    finish,
    make_shard,
    num_classes_of,
    reference_classifier,
    shard_counts,
)


def run(cfg: GenerateConfig) -> dict:
    check(cfg)
    dist = Dist()
    model = load_model(cfg.model)
    if cfg.guidance != 1.0 and not model.conditional:
        raise UserError(f"{cfg.model} is unconditional: classifier-free guidance (--guidance) needs labels")
    make_sampler(model, cfg.sampler, cfg.sample_steps)  # refuses bad steps before any heavy work
    device = str(dist.device)
    model.unet.to(device)
    num_classes = model.num_classes if model.conditional else num_classes_of(cfg.real_train)
    classes = class_names(cfg, num_classes)
    ref = None
    if cfg.check or not model.conditional or cfg.filter != Filter.none:  # trained (or loaded) once, by rank 0
        shape = (model.image_size, model.in_channels)
        ref = dist.broadcast(reference_classifier(cfg, num_classes, shape) if dist.is_main else None)
    clf = ref.model if ref is not None else None
    stage = storage.start(cfg.out, signature=SIGNATURE) if dist.is_main else storage.staging_path(cfg.out)
    dist.barrier()
    counts = shard_counts(cfg.n, cfg.shard_size)
    mine = [s for s in range(len(counts)) if s % dist.world == dist.rank]
    records, agree, tried = {}, np.zeros((2, num_classes), np.int64), 0
    t0 = time.time()
    with tqdm(total=sum(counts[s] for s in mine), desc="generate", unit="img", mininterval=2,
              disable=not dist.is_main) as bar:
        for s in mine:
            images, labels, t, raw = make_shard(model, cfg, s, counts[s], clf, device, bar.update)
            keys = make_keys(KEY_PREFIX, "train", counts[s], start=s * cfg.shard_size)
            records[s] = write_shard(storage.join(stage, "train"), s, keys, images, labels)
            records[s]["labels"] = labels.tolist()
            if raw is not None:  # the generator's own labels, judged on every candidate (before a filter)
                agree += raw
            tried += t
    seconds = time.time() - t0
    gathered = dist.gather((records, agree, tried, seconds))
    if dist.is_main:
        report = finish(cfg, model, stage, classes, gathered, ref)
    dist.barrier()
    return report if dist.is_main else {"out": cfg.out, "shards": mine}

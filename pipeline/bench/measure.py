"""What every figure group of `python -m pipeline bench` shares: the check of its settings, the
real inputs (shards and a UNet), the extract settings, and training steps the benchmark can
interleave (the recipe and the claims: stages/bench.py; the figure groups: extraction.py,
training.py, streaming.py)."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import torch

from pipeline.bench.config import BenchConfig
from pipeline.cache.config import ExtractConfig
from pipeline.core.errors import UserError
from pipeline.core.runtime import choose_device
from pipeline.diffusion.config import DiffusionConfig

ROOT = Path(__file__).resolve().parents[2]  # the repository (children run `python -m pipeline` there)


def check_config(cfg: BenchConfig) -> None:
    cfg.validate()
    if cfg.profile == "gpu":
        if not cfg.dry_run and not torch.cuda.is_available():
            raise UserError("no CUDA GPU here; use --dry-run to check the GPU profile's code paths on the CPU")
        return
    if not (Path(cfg.source).exists()):
        raise UserError(f"--source {cfg.source}: not found (the Fashion-MNIST IDX folder)")
    choose_device(cfg.device)  # the project's one device rule: a bad or unavailable --device is one line


def quiet(fn: Any, *args: Any, **kwargs: Any) -> Any:
    """Run a stage's code without its stdout lines (the bench prints one table)."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args, **kwargs)


def say(msg: str) -> None:
    print(f"bench: {msg}", file=sys.stderr, flush=True)


# --- inputs ------------------------------------------------------------------------------------
def make_inputs(cfg: BenchConfig, work: Path) -> tuple[Path, Path]:
    """Real shards (first n of each split) and a default-size class-conditional UNet (random weights)."""
    from pipeline.core.shards import join, make_keys, write_split
    from pipeline.data.sources import read_source
    from pipeline.diffusion.model import build_unet, make_scheduler, save_model

    shards = work / "shards"
    for split, data in read_source(cfg.source, limit=cfg.n).items():  # what `prepare` writes
        quiet(write_split, join(shards, split), data, make_keys("fmnist", split, len(data.labels)), shard_size=1024,
              progress=False)
    d = DiffusionConfig()
    torch.manual_seed(cfg.seed)
    unet = build_unet(image_size=28, in_channels=1, num_classes=10, block_channels=d.block_channels,
                      layers_per_block=d.layers_per_block)
    model = work / "unet"
    save_model(model, unet, make_scheduler(d.num_train_timesteps, d.beta_schedule), {})
    return shards, model


def extract_config(cfg: BenchConfig, shards: Path, model: Path, out: Path) -> ExtractConfig:
    return ExtractConfig(model=str(model), real_splits=str(shards), synthetic="", out=str(out), t=cfg.t, layer=cfg.layer,
                         views=cfg.views, batch_size=cfg.batch_size, chunks_per_shard=cfg.chunks_per_shard,
                         seed=cfg.seed)


# --- training steps and the target reader ------------------------------------------------------
def feed_steps(tr: Any) -> Any:
    """(batch, inputs) of the trainer's feed, epoch after epoch; closes the prefetch thread."""
    epoch = 0
    while True:
        feed = tr.feed(epoch, 0)
        try:
            yield from feed
        finally:
            feed.close()
        epoch += 1


def step_fns(trainers: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A callable per trainer running its next training step (the benchmark interleaves them), and
    the feeds to close afterwards. Step 0 each time: the lr schedule does not change the cost."""
    feeds = {name: feed_steps(tr) for name, tr in trainers.items()}

    def step(name: str) -> Any:
        def one() -> None:
            tr = trainers[name]
            tr.net.train()
            batch, inputs = next(feeds[name])
            tr.step(0, batch, inputs)
        return one

    return {name: step(name) for name in trainers}, feeds

"""Stage one, `extract`: the diffusion model runs once over every (sample, view) -> feats.zarr.

Recipe: validate everything (model, t, layer, shards) -> sample and record K views and a noise
seed per (sample, view) for each part -> for every zarr shard not yet written (and checked),
compute its rows and write it in one assignment, in a background thread while the next shard
computes -> per-dimension mean/std -> linear probe -> checksums -> "complete".

Under ``accelerate launch`` the missing (part, shard) pairs are dealt round-robin, so each process
owns whole shards; rank 0 creates the store before and finalises it after a barrier, so the store
equals a single-process one byte for byte.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.cache.build import extract
from pipeline.cache.config import ExtractConfig


def run(cfg: ExtractConfig) -> dict:
    """Everything lives in ``pipeline/cache/`` (build: the recipe's steps; store: the Zarr format)."""
    return extract(cfg)


def interrupted(cfg: ExtractConfig) -> str:
    """What an interrupt leaves (the CLI's one line): every zarr shard written is kept and reused."""
    if "://" not in cfg.out and not Path(cfg.out).exists():
        return f"nothing written yet to {cfg.out}; rerun the same command"
    return f"the zarr shards written so far are kept in {cfg.out} (incomplete); rerun the same command to resume"

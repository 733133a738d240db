"""Stage two, `train`: adversarial training with DRA targets read from the feature cache.

Recipe: validate flags -> open the cache (refuses incomplete stores) -> load the image shards it
names and refuse any mismatch (data, image size, augmentation spec, keys) -> target reader (RAM
or streamed) -> classifier + projection head + SGD + EMA -> resume -> per step: sampled
(sample, view) batch, recorded view replayed, PGD on top of it, AT loss + lambda * DRA loss ->
per epoch: log row + checkpoint (safetensors + JSON) -> metrics.json, with the peak RSS of every
process (streamed targets keep it flat however large the cache is).

An ``--out`` that already holds a run is refused: ``--resume`` continues an unfinished one,
``--overwrite`` replaces a finished or unfinished one. ``--dra-weight 0`` is plain AT (no head, no
targets read). ``--online`` computes the same
targets with the diffusion model inside the step, for equivalence tests and cost comparison.
Under ``accelerate launch`` each process trains on its own slice of every global batch.
Everything lives in ``pipeline/train/`` (``Trainer``).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.train import state
from pipeline.train.config import TrainConfig
from pipeline.train.trainer import Trainer


def run(cfg: TrainConfig, *, stop_after_steps: int | None = None) -> dict:
    """Train; ``stop_after_steps`` (tests) checkpoints and returns after that many steps, like a kill."""
    return Trainer.create(cfg).fit(stop_after_steps=stop_after_steps)


def interrupted(cfg: TrainConfig) -> str:
    """What an interrupt leaves (the CLI's one line): the last checkpoint, never a finished-looking run."""
    kind, step = state.status(Path(cfg.out))
    if kind == "finished":  # stopped before this run wrote anything
        return f"the finished run in {cfg.out} is untouched"
    if kind == "unfinished":
        return f"checkpoint at step {step} kept in {cfg.out}; rerun with --resume"
    return f"no checkpoint written yet in {cfg.out}; rerun the same command"

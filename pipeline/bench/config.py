"""Sizes of `python -m pipeline bench` (not a DVC stage)."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.classifiers.archs import Arch
from pipeline.core.config import coerce_enums, require

GROUPS = ("extract", "multi", "train", "memory", "two_proc", "images", "ingest")


@dataclass(frozen=True)
class BenchConfig:
    """Sizes of the benchmark; the defaults run in a few minutes on 2 CPU cores."""

    profile: str = "cpu"  # cpu: the cache's figures on Fashion-MNIST (below); gpu: CIFAR-sized figures on one CUDA GPU
    dry_run: bool = False  # --profile gpu at tiny sizes on the CPU (checks its code paths)
    source: str = "data/fashion-mnist"  # real images (prepared into a temporary folder)
    out: str = "artifacts/bench/bench.json"  # the result JSON (and the table beside it, .txt)
    n: int = 2048  # real images of each split (train, test) that extract and training use
    views: int = 4  # K of the train part
    t: int = 100  # timestep of the extracted targets
    layer: str = "mid_block"  # UNet block of the extracted targets
    # the multi-target extraction: every (t, layer) of these lists in one pass, timed against one
    # pass for the first t and the *last* layer (the deepest: the forward must reach it either way)
    multi_t: str = "100,20,400"  # timesteps of the multi-target extraction
    multi_layer: str = "mid_block,up_blocks.0"  # layers of the multi-target extraction
    multi_repeats: int = 2  # interleaved repeats of the multi-target timing
    batch_size: int = 256  # extract batch, and the bare forward's
    chunks_per_shard: int = 4  # extract's zarr shards (several per part, so 2 processes share the work)
    repeats: int = 5  # interleaved repeats of extract vs the bare forward (memory children: 2, 2-process runs: 2)
    train_steps: int = 40  # timed steps of each training variant, interleaved step by step
    train_batch_size: int = 128  # batch of the timed training steps
    attack_steps: int = 5  # PGD steps of the timed training steps
    arch: Arch = Arch.cnn  # classifier of the timed training steps
    online_full: bool = True  # also time online DRA with the whole UNet forward (as the paper runs it)
    memory_budget_mb: int = 64  # the reader's budget for the flat-memory check
    stream_cache_mb: int = 400  # raw size of the synthetic store read under that budget (and one half as big)
    two_proc: bool = True  # time extract with 2 processes vs 1 (accelerate launch)
    # images streamed with their targets: CIFAR-sized train parts of these sizes (the big one is
    # ~6 GiB of random, incompressible pixels on disk), timed steps per training child, reader batches
    image_rows_small: int = 200_000  # rows of the small streamed train part
    image_rows_big: int = 2_000_000  # rows of the big one
    image_steps: int = 20  # timed steps per training child
    image_reader_batches: int = 2000  # batches timed of the bare reader
    # prepare and extract on CIFAR-sized random npz sets of these sizes (the big one: ~6 GiB of npz, as
    # much again in shards), prepare with this many processes
    ingest_rows_small: int = 200_000  # rows of the small npz set
    ingest_rows_big: int = 2_000_000  # rows of the big one
    ingest_workers: int = 2  # prepare --workers
    only: str = ""  # run only these figure groups (comma list of extract,multi,train,memory,two_proc,images,ingest)
    workdir: str = ""  # scratch folder ("" : a temporary one, removed afterwards)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = 0  # data, views and weights of every measurement

    def __post_init__(self) -> None:
        coerce_enums(self)

    def validate(self) -> None:
        sizes = ("n", "views", "batch_size", "chunks_per_shard", "repeats", "multi_repeats", "train_steps", "train_batch_size",
                 "memory_budget_mb", "stream_cache_mb", "image_rows_small", "image_rows_big", "image_steps",
                 "image_reader_batches", "ingest_rows_small", "ingest_rows_big", "ingest_workers")
        require(self, [(getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be >= 1, got {getattr(self, n)}")
                       for n in sizes] + [
            (self.n >= 2 * self.train_batch_size,
             f"--n {self.n} must hold at least two training batches of {self.train_batch_size}"),
            (self.image_rows_big > self.image_rows_small >= 2 * self.train_batch_size,
             "--image-rows-big must exceed --image-rows-small, which must hold two training batches"),
            (self.ingest_rows_big > self.ingest_rows_small >= 100,
             "--ingest-rows-big must exceed --ingest-rows-small, which must be at least 100 (the probe's split)"),
            (set(self.groups) <= set(GROUPS), f"--only: choose among {', '.join(GROUPS)}, got {self.only!r}"),
            (self.profile in ("cpu", "gpu"), f"--profile: choose cpu or gpu, got {self.profile!r}"),
            (not self.dry_run or self.profile == "gpu", "--dry-run is for --profile gpu")])

    @property
    def groups(self) -> list[str]:
        """The figure groups this run measures (``--only``, else all of them)."""
        return [g for g in self.only.replace(" ", "").split(",") if g] or list(GROUPS)

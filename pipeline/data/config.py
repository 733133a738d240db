"""Defaults of `prepare` (the CLI's flags; `params.yaml` overrides them for DVC)."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pipeline.core.config import coerce_enums, require

# limits every reader of a raw dataset applies, and the class names of a 3-channel set without its own
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck"]
MAX_CLASSES = 100_000  # more class indices than any labelled set has (ImageNet-21k: 21,841)
MAX_SOURCE_BYTES = 8 * 2**30  # larger than any IDX dataset (or npz read whole); a header claiming more is refused unread


class SourceFormat(str, Enum):
    """Raw dataset formats that ``prepare`` reads."""

    auto = "auto"  # told by the files found
    idx = "idx"  # MNIST/Fashion-MNIST IDX files (optionally .gz)
    cifar10 = "cifar10"  # CIFAR-10 python pickle batches
    cifar100 = "cifar100"  # CIFAR-100 python pickle files
    folder = "folder"  # image-folder tree: ROOT/[split/]class/image.png
    npz = "npz"  # generated images: arrays `image` (N,H,W,C uint8) and `label`


class Encoding(str, Enum):
    """How shards hold each image (readers take either)."""

    auto = "auto"  # npy for npz sources (generated sets of millions: fast to write and read), png otherwise
    png = "png"  # lossless PNG: smallest on natural images, viewable
    npy = "npy"  # the raw uint8 array (.npy): no encoding or decoding cost, about the raw size


@dataclass(frozen=True)
class PrepareConfig:
    source: str = "data/fashion-mnist"  # the raw dataset: a folder (or an .npz file) in one of the --format formats
    format: SourceFormat = SourceFormat.auto  # the source's format (auto: told by its files)
    out: str = "artifacts/shards/real"  # output folder: one sub-folder of shards per split (path or fsspec URL)
    key_prefix: str = ""  # prefix of every sample key in the shards; empty: derived from the source folder name
    shard_size: int = 10_000  # samples per tar shard
    limit: int = 0  # keep the first N samples of each split (0: all)
    encoding: Encoding = Encoding.auto  # how shards hold each image (the benchmark's ingest figures compare them)
    workers: int = 1  # processes that encode and write shards (each takes whole shards)
    shuffle_seed: int = -1  # N >= 0: write each split in a stratified order shuffled with seed N (every prefix class-balanced; needed for a source sorted by label); -1: the source's order

    def __post_init__(self) -> None:
        coerce_enums(self)

    def validate(self) -> None:
        require(self, [(self.limit >= 0, f"--limit must be >= 0, got {self.limit}"),
                       (self.shuffle_seed >= -1, f"--shuffle-seed must be >= 0 (or -1: keep the source's order), "
                                                 f"got {self.shuffle_seed}"),
                       (self.shard_size > 0, f"--shard-size must be positive, got {self.shard_size}"),
                       (self.workers >= 1, f"--workers must be >= 1, got {self.workers}")])

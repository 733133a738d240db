"""Defaults of `extract` (stage one)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from pipeline.cache.contract import Condition
from pipeline.cache.targets import Pooling
from pipeline.core.config import coerce_enums, comma_tuple, require
from pipeline.core.views import ViewSpec

MIN_ROWS = 10  # a train part smaller than this cannot fit and score the linear probe
MAX_DRAWS = 64  # noise draws per view (the paper uses one)


class ViewDraw(str, Enum):
    """How K < all views of a sample are drawn (pipeline/core/views.py: sample_views)."""

    uniform = "uniform"  # K distinct views uniformly from the view space: every training draw is a standard augmentation
    identity_first = "identity-first"  # view 0 the identity, the others random (stores made before uniform existed)


@dataclass(frozen=True)
class ExtractConfig:
    model: str = "artifacts/diffusion"  # the diffusion model folder (from `diffusion`) or a diffusers UNet folder
    real_splits: str = "artifacts/shards/real"  # the real shards: a folder with one sub-folder per split (from `prepare`)
    synthetic: str = "artifacts/shards/synthetic"  # the synthetic shards (from `generate`); "" for none
    out: str = "artifacts/feats.zarr"  # the feature cache to write (path or fsspec URL); an unfinished one is resumed
    # one target set per (t, layer): comma lists ("10,100,200", "mid_block,up_blocks.0") cost one
    # forward per timestep (every layer hooked in it); the first t and the first layer are the default set
    t: tuple[int, ...] = (100,)  # diffusion timestep(s) at which each image is noised before the UNet forward
    layer: tuple[str, ...] = ("mid_block",)  # UNet block(s) whose output is the target (comma list: one set per (t, layer))
    pooling: Pooling = Pooling.mean
    # K random views per image (drawn as --view-draw says), or "all": every distinct view of the view
    # spec in a fixed order (core/views.py:all_views), i.e. exact targets for standard augmentation
    views: str = "4"  # views of each real train image
    view_draw: ViewDraw = ViewDraw.uniform  # how K < all views are drawn (identity-first: view 0 is always the identity)
    views_synthetic: str = "4"  # views of each synthetic image: augmented like the real ones (as DM-AT does)
    draws: int = 1  # noise draws averaged per view
    # store the train and synthetic parts' images in the cache too (row order, chunked like the
    # features): training then streams images with their targets, at flat memory for any set size
    images: bool = True
    # copy the diffusion model (UNet config + weights, scheduler config, model_info.json) into the
    # store (OUT/model/, in the manifest): a receiver can recompute any row from the store alone
    bundle_model: bool = False
    condition: Condition = Condition.null  # class conditioning used while extracting
    view: ViewSpec = field(default_factory=ViewSpec)
    batch_size: int = 256  # images per UNet forward
    rows_per_chunk: int = 256  # samples per zarr chunk (the reader's unit of I/O)
    chunks_per_shard: int = 16  # chunks per zarr shard (the writer's and resume unit)
    compressor: str = "blosc-zstd"  # blosc-zstd | blosc-lz4 | zstd (see pipeline/cache/store/layout.py)
    limit: int = 0  # first N samples of each part (0: all)
    # the synthetic part's own limit: a study with few real and many generated images (DM-AT's ratio)
    # embeds its first --limit real rows and every generated one
    synthetic_limit: int = -1  # first N synthetic samples (-1: --limit's, 0: all)
    seed: int = 0  # the views drawn and each (image, view)'s noise seed

    def __post_init__(self) -> None:
        coerce_enums(self)
        for name in ("views", "views_synthetic"):  # ints given in code or YAML: the same setting
            object.__setattr__(self, name, str(getattr(self, name)).replace(" ", ""))
        # t and layer: tuples from the CLI on (a comma list, one value or a list given in code: the same)
        object.__setattr__(self, "t", comma_tuple(self.t, int, "t"))
        object.__setattr__(self, "layer", comma_tuple(self.layer, str, "layer"))

    def k_of(self, views: str) -> int:
        """K of a part: a count, or every distinct view of the view spec ("all")."""
        return self.view.n_views if views == "all" else int(views)

    def validate(self) -> None:
        """Sizes and counts: refused before anything is loaded."""
        self.view.validate()
        sizes = ("draws", "batch_size", "rows_per_chunk", "chunks_per_shard")
        views = [(v == "all" or (v.isdecimal() and int(v) >= 1), f"--{n.replace('_', '-')} must be a count >= 1 or "
                  f"'all', got {v!r}") for n, v in (("views", self.views), ("views_synthetic", self.views_synthetic))]
        views.append((bool(self.t) and min(self.t) >= 0 and len(set(self.t)) == len(self.t),
                      f"--t must be one timestep >= 0 or a comma list of distinct ones (10,100,200), got "
                      f"{','.join(map(str, self.t))!r}"))
        views.append((bool(self.layer) and all(self.layer) and len(set(self.layer)) == len(self.layer),
                      f"--layer must be one block or a comma list of distinct ones, got {','.join(self.layer)!r}"))
        require(self, views + [(getattr(self, n) >= 1, f"--{n.replace('_', '-')} must be >= 1, got {getattr(self, n)}")
                               for n in sizes] + [
            (self.limit == 0 or self.limit >= MIN_ROWS, f"--limit must be 0 (all) or >= {MIN_ROWS} (the probe fits "
             f"on 80% of the train part and scores the rest), got {self.limit}"),
            (self.synthetic_limit >= -1, f"--synthetic-limit must be -1 (--limit's), 0 (all) or a count, got {self.synthetic_limit}"),
            (self.draws <= MAX_DRAWS, f"--draws must be <= {MAX_DRAWS} (each draw is one more UNet forward), got {self.draws}")]
            + [(v == "all" or int(v) <= self.view.n_views, f"--{n.replace('_', '-')} {v}: the view spec has only "
                f"{self.view.n_views} distinct views; use 'all' for every one of them")
               for n, v in (("views", self.views), ("views_synthetic", self.views_synthetic))
               if v == "all" or v.isdecimal()])

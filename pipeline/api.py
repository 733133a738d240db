"""The public Python API: a feature cache and a trained run, from your own training loop.

    from pipeline import api
    store = api.open_store("feats.zarr")              # every file checked against the manifest
    loader = api.dataloader(store, batch_size=64)     # (view images, labels, targets), streamed past RAM
    x, y, target = next(iter(loader))                 # x: (64, C, H, W) in [0, 1]; target: (64, *shape)
    model, head, config = api.load_classifier("artifacts/train/at_dra")  # EMA classifier + DRA head

- ``open_store(url)``: a complete, verified store (any path or fsspec URL; ``digest=`` requires the
  digest a sender gave you through a channel you trust).
- ``CacheDataset(store, part)``: a torch ``Dataset`` of one part seen through one target set.
  Sample ``i`` is (row, view) = ``divmod(i, K)``; it yields (view image float (C, H, W) in [0, 1],
  label, target float32 of the set's shape), with exactly `train`'s view replay: the recorded
  crop + flip of view k applied to image n (``core/views.py: apply_views``) and ``features[n, k]``
  as its target, assembled by the same function `train` uses (``train/data.py: assemble``).
- ``dataloader(store, part)``: batches in `train`'s order (the chunk-aware shuffle when streaming:
  with the same seed and batch size, the batches `train` draws on one process), images and targets
  streamed chunk by chunk from the store above the memory budget, so memory stays flat in N.
- ``load_classifier(run_folder)``: the trained classifier (EMA weights, eval mode), the DRA
  projection head when the run had one (else None; the per-location head of an ``--align-layer``
  run too), and the run's ``config.json``; ``.project(x)`` gives (logits, the head's projection).

Images come from the store where the part stores them (checked against the image split's records
when the split the store names is reachable; otherwise vouched for by the store's manifest and
digest only, with a warning saying so: pass ``shards=`` to check them); a part extracted with
``--no-images`` reads them from ``shards=`` or the split the store names. Use ``num_workers=0``:
the loader prepares batches in a background thread, as `train` does.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from pipeline.cache.store import FeatureCache, open_cache, verify_cache
from pipeline.classifiers.zoo import load_classifier as _load_ema_classifier
from pipeline.core.errors import UserError
from pipeline.train.config import TargetNorm
from pipeline.train.data import (
    WINDOW,
    PartData,
    assemble,
    image_note,
    load_part,
    plan_memory,
    target_reader,
    target_whitening,
)
from pipeline.train.model import DRANet, MapHead, ProjectionHead
from pipeline.train.readers import Prefetcher
from pipeline.train.sampler import Batch, MixedSampler
from pipeline.train.state import STATE_FILE
from pipeline.train.step import normalise_targets

__all__ = ["CacheDataset", "Trained", "dataloader", "load_classifier", "open_store"]


def open_store(url: str | Path, *, verify: bool = True, digest: str | None = None) -> FeatureCache:
    """Open a complete feature cache (path or fsspec URL) for reading.

    ``verify`` checks every file against the store's manifest, the shapes and NaN/Inf, as
    ``cache verify`` does (it reads the whole store once; off: only the cheap checks of every open:
    completeness, format, the digest of the attributes). ``digest``: the 64 hex digits the sender
    published; the store must have exactly that digest. A problem raises ``UserError``.
    """
    url = str(url)
    if verify or digest is not None:
        problems = verify_cache(url, digest=digest)
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise UserError(f"{url}: {problems[0]}{more}")
    return open_cache(url)


class CacheDataset(torch.utils.data.Dataset):
    """(view image, label, target) of every (row, view) of one cache part, for one target set.

    ``store``: an opened store or its URL. ``t``/``layer``: the target set (either left out: the
    default set's). ``limit``: the first N rows (0: all). ``shards``: the image split to check the
    stored images against (or to read them from, for a part without stored images); "" uses the
    split the store names. ``stream``: read images and targets chunk by chunk (None: when the part
    exceeds ``memory_budget_mb``, as `train` decides). ``target_norm``: "none" (the stored values),
    "center" or "whiten" with the part's mean/std (what `train --target-norm` does).
    """

    def __init__(self, store: FeatureCache | str | Path, part: str = "train", *, t: int | None = None,
                 layer: str | None = None, limit: int = 0, shards: str = "", stream: bool | None = None,
                 memory_budget_mb: int = 2048, target_norm: str = "none", check_images: bool = True) -> None:
        self.cache = store if isinstance(store, FeatureCache) else open_store(store)
        self.target = self.cache.target(t, layer)
        self.norm = TargetNorm(target_norm)
        p = self.cache.part(part, self.target)
        rows = p.n if limit <= 0 else min(limit, p.n)
        if stream is None:
            stream = plan_memory({part: (p, rows)}, features=True, budget_mb=memory_budget_mb)[0]
        data, _ = load_part(self.cache, part, shards_dir=shards, limit=limit, view_spec=None, image_size=None,
                            target=self.target, stream=stream, verify=check_images)
        self.data: PartData = replace(data, reader=target_reader(p, data.n, stream=stream))
        self.stream, self.rows_per_chunk = stream, p.rows_per_chunk
        self.pad = self.cache.plan.view_spec.pad
        self.mean, self.std = torch.from_numpy(p.mean).float(), torch.from_numpy(p.std).float()
        # --target-norm pca: the same whitening as train's (the same rows and views drawn)
        self.whitening = target_whitening(p, rows) if self.norm is TargetNorm.pca else None
        self.note = image_note(part, self.data, self.cache.digest, flag="shards=")
        if self.note:
            warnings.warn(self.note.removeprefix("note: "), stacklevel=2)

    @property
    def n(self) -> int:
        """Rows (images)."""
        return self.data.n

    @property
    def k(self) -> int:
        """Recorded views per row."""
        return self.data.k

    def __len__(self) -> int:
        return self.n * self.k

    def index(self, i: int) -> tuple[int, int]:
        """Sample ``i`` -> (row, view)."""
        if not 0 <= i < len(self):
            raise IndexError(f"sample {i} outside 0..{len(self) - 1}")
        return divmod(int(i), self.k)

    def batch(self, rows: np.ndarray, views: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x (B, C, H, W) float in [0, 1], y (B,) int64, target (B, *shape) float32) of (row, view) pairs,
        assembled as `train` assembles its batches."""
        rows, views = np.asarray(rows, np.int64), np.asarray(views, np.int64)
        inputs = assemble(Batch(rows, views, rows[:0], views[:0], 0, 0), self.data, None, self.pad)
        target = normalise_targets(inputs["target"].float(), self.mean, self.std, self.norm, self.whitening)
        return inputs["x"], inputs["y"], target

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int, torch.Tensor]:
        row, view = self.index(i)
        x, y, target = self.batch(np.array([row]), np.array([view]))
        return x[0], int(y[0]), target[0]


class _Batches(torch.utils.data.IterableDataset):
    """One epoch of (x, y, target) batches per iteration, in `train`'s order (``MixedSampler``)."""

    def __init__(self, ds: CacheDataset, batch_size: int, seed: int, prefetch: int) -> None:
        super().__init__()
        self.ds, self.prefetch, self.epoch = ds, prefetch, 0
        try:
            self.sampler = MixedSampler(n_real=ds.n, k_real=ds.k, batch_size=batch_size, seed=seed,
                                        chunk_real=ds.rows_per_chunk if ds.stream else 0, window=WINDOW)
        except ValueError as exc:
            raise UserError(str(exc)) from None

    def __len__(self) -> int:
        return self.sampler.steps_per_epoch

    def set_epoch(self, epoch: int) -> None:
        """The epoch the next iteration yields (each iteration moves on to the next one)."""
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        epoch, self.epoch = self.epoch, self.epoch + 1
        feed = Prefetcher(self.sampler.batches(epoch), lambda b: self.ds.batch(b.real_rows, b.real_views),
                          self.prefetch)
        try:
            for _, batch in feed:
                yield batch
        finally:
            feed.close()


def dataloader(store: FeatureCache | str | Path, part: str = "train", *, batch_size: int = 128, seed: int = 0,
               prefetch: int = 2, **dataset_args: Any) -> torch.utils.data.DataLoader:
    """A ``DataLoader`` of (x, y, target) batches of one cache part (``dataset_args``: those of
    ``CacheDataset``: t, layer, limit, shards, stream, memory_budget_mb, target_norm, check_images).

    Each iteration is one epoch: ``ceil(N / batch_size)`` batches of exactly ``batch_size`` samples
    from an endless stream of shuffled passes, each row with a view drawn from its K recorded ones;
    with the same ``seed`` and ``batch_size``, the batches `train` draws (one process, no synthetic
    mix). Streaming (above the memory budget, or ``stream=True``), the order is chunk-aware and
    images and targets are read chunk by chunk, so memory stays flat however large the store is.
    ``loader.dataset.set_epoch(e)`` picks the epoch of the next iteration (e.g. to resume).
    """
    ds = CacheDataset(store, part, **dataset_args)
    return torch.utils.data.DataLoader(_Batches(ds, batch_size, seed, prefetch), batch_size=None, num_workers=0)


class Trained(NamedTuple):
    """What ``load_classifier`` returns."""

    classifier: torch.nn.Module  # EMA weights, eval mode: logits = classifier(x), x in [0, 1]
    head: torch.nn.Module | None  # the DRA projection head (None without DRA); what it reads: ``project``
    config: dict  # the run's config.json (arch, shapes, the training config, the cache it used)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(logits, the head's projection of ``x``, shaped like the run's target; None without a head):
        the forward DRA aligned in training, whether the head reads the final pooled features or a
        block's map (``--align-layer``)."""
        align_layer = (self.config.get("train") or {}).get("align_layer") or ""
        return DRANet(self.classifier, self.head, align_layer if self.head is not None else "")(x)


def _head(folder: Path, device: str, config: dict) -> torch.nn.Module | None:
    """The DRA head from the run's state file (``net.head.*``: the weights at the last checkpoint),
    rebuilt as the run built it: ``MapHead`` for ``--align-layer`` runs (1x1 convolutions per
    location, pooled to the target's grid), else ``ProjectionHead`` (output shaped like a grid target)."""
    try:
        with safe_open(str(folder / STATE_FILE), framework="pt", device="cpu") as fh:
            tensors = {k[len("net.head."):]: fh.get_tensor(k) for k in fh.keys() if k.startswith("net.head.")}
    except (SafetensorError, OSError) as exc:
        raise UserError(f"{folder / STATE_FILE}: unreadable ({str(exc).splitlines()[0]})") from None
    if not tensors:
        return None
    shape = (config.get("cache") or {}).get("target_shape")
    grid_shape = tuple(shape) if isinstance(shape, list) and len(shape) == 3 else None
    align_layer = (config.get("train") or {}).get("align_layer")
    if align_layer and shape is None:
        raise UserError(f"{folder}: the run (--align-layer {align_layer!r}) does not record its target's shape; "
                        "train it again to load its head (head=False loads the classifier alone)")
    try:
        first, last = tensors["net.0.weight"], tensors["net.4.weight"]
        if align_layer:
            head = MapHead(int(first.shape[1]), int(first.shape[0]), int(last.shape[0]),
                           grid_shape[1] if grid_shape else None)
        else:
            head = ProjectionHead(int(first.shape[1]), int(first.shape[0]), int(last.shape[0]), grid_shape)
        head.load_state_dict(tensors)
    except (KeyError, ValueError, RuntimeError, IndexError) as exc:
        raise UserError(f"{folder / STATE_FILE}: the DRA head does not load ({str(exc).splitlines()[0]})") from None
    return head.to(device).eval()


def load_classifier(run_folder: str | Path, device: str = "cpu", *, head: bool = True) -> Trained:
    """A `train` run folder -> (classifier, head, config). Only safetensors and JSON are read
    (nothing is unpickled). A run without DRA (``--dra-weight 0``) or a folder without its state
    file has no head (None); ``head=False`` loads the classifier alone. The head is the one the run
    trained: on the final pooled features, or, with ``--align-layer``, per location on that block's
    map (``Trained.project`` runs either as training did)."""
    folder = Path(run_folder)
    classifier, config = _load_ema_classifier(folder, device=device)
    if not head or not (folder / STATE_FILE).is_file():
        return Trained(classifier, None, config)
    return Trained(classifier, _head(folder, device, config), config)

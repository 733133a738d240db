"""Which (sample, view) pairs each training step reads, and the real:synthetic mixing.

Sampling is a pure function of (seed, epoch, step): nothing is carried from one step to the
next, so a resumed run draws exactly the batches an uninterrupted one would, and each process of
a data-parallel run can compute its own slice of the global batch without communication.

- The training budget (one definition for every variant, the DM-AT convention of
  wzekai99/DM-Improves-AT, ``core/data/semisup.py``: ``num_batches = ceil(dataset_size /
  batch_size)`` with the real set's size): an epoch is ``ceil(n_real / batch_size)`` steps
  whatever the mix, and every step holds exactly ``batch_size`` samples, ``b_real`` real and
  ``b_syn`` synthetic. So runs with the same epochs and batch size make the same number of
  optimizer steps and see the same number of samples; with 70% synthetic, an epoch shows 30% of
  the real set (DM-AT does the same).
- Each part (real, synthetic) is an endless stream of shuffled passes, each sample with a view
  drawn uniformly from its K recorded views per pass; step g of the run reads positions
  ``[g * b, (g + 1) * b)`` of each stream. A pass may end inside a step (the next pass begins there).
- ``chunk_real``/``chunk_syn`` > 0 make the order chunk-aware (training passes the cache's
  chunking in every memory mode, so one seed gives one order): the order of the cache's chunks is
  shuffled, then rows are shuffled within windows of a few consecutive chunks, so a reader that
  holds a couple of windows in memory reads every chunk once per pass.

The readers that turn (rows, views) into targets and images are in readers.py.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np

_REAL, _SYN, _VIEW = 0, 1, 2


def permutation(n: int, rng: np.random.Generator, rows_per_chunk: int = 0, window: int = 4) -> np.ndarray:
    """A shuffle of range(n); chunk-aware when rows_per_chunk > 0 (see module docstring)."""
    if rows_per_chunk <= 0:
        return rng.permutation(n)
    n_chunks = -(-n // rows_per_chunk)
    order = rng.permutation(n_chunks)
    out = []
    for w in range(0, n_chunks, window):
        rows = np.concatenate([np.arange(c * rows_per_chunk, min((c + 1) * rows_per_chunk, n))
                               for c in order[w:w + window]])
        out.append(rows[rng.permutation(len(rows))])
    return np.concatenate(out)


@dataclass(frozen=True)
class Batch:
    """One (per-process) batch: indices into the parts, the drawn views, and where it sits."""

    real_rows: np.ndarray  # (n_real,) rows of the real part
    real_views: np.ndarray
    syn_rows: np.ndarray  # (n_syn,) rows of the synthetic part (empty without one)
    syn_views: np.ndarray
    epoch: int
    step: int


class MixedSampler:
    """Seeded (sample, view) batches with an exact per-batch real:synthetic split.

    ``rank``/``world`` select this process's slice of every global batch (real and synthetic
    parts are split separately, so each process keeps the exact fraction).
    """

    def __init__(self, *, n_real: int, k_real: int, batch_size: int, seed: int, n_syn: int = 0,
                 k_syn: int = 1, synthetic_fraction: float = 0.0, rank: int = 0, world: int = 1,
                 chunk_real: int = 0, chunk_syn: int = 0, window: int = 4) -> None:
        if not 0.0 <= synthetic_fraction < 1.0:
            raise ValueError(f"synthetic_fraction must be in [0, 1), got {synthetic_fraction}")
        if synthetic_fraction > 0 and n_syn == 0:
            raise ValueError("synthetic_fraction > 0 needs synthetic samples")
        self.b_syn = int(round(batch_size * synthetic_fraction))
        self.b_real = batch_size - self.b_syn
        if self.b_real < world or (self.b_real % world) or (self.b_syn % world):
            raise ValueError(f"batch split {self.b_real}+{self.b_syn} does not divide over {world} processes")
        if n_real < self.b_real:
            raise ValueError(f"{n_real} real samples cannot fill one batch of {self.b_real}")
        self.n_real, self.k_real, self.n_syn, self.k_syn = n_real, k_real, n_syn, k_syn
        self.seed, self.rank, self.world = seed, rank, world
        self.chunk_real, self.chunk_syn, self.window = chunk_real, chunk_syn, window
        self.steps_per_epoch = -(-n_real // batch_size)
        self._cache: dict[tuple, np.ndarray] = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _memo(self, key: tuple, make: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def _pass(self, part: int, p: int) -> tuple[np.ndarray, np.ndarray]:
        """Pass ``p`` of a part's stream: the shuffled rows and each row's view."""
        n, k, chunk = ((self.n_real, self.k_real, self.chunk_real) if part == _REAL
                       else (self.n_syn, self.k_syn, self.chunk_syn))
        perm = self._memo((part, p), lambda: permutation(n, self._rng(part, p), chunk, self.window))
        views = self._memo((part, p, _VIEW), lambda: self._rng(_VIEW, part, p).integers(0, k, n))
        return perm, views

    def _stream(self, part: int, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions start..start+count of a part's endless stream: (rows, views)."""
        n = self.n_real if part == _REAL else self.n_syn
        rows, views = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
        pos = start
        while pos < start + count:
            p, off = divmod(pos, n)
            take = min(n - off, start + count - pos)
            perm, v = self._pass(part, p)
            rows.append(perm[off:off + take])
            views.append(v[perm[off:off + take]])
            pos += take
        return np.concatenate(rows), np.concatenate(views)

    def batch(self, epoch: int, step: int) -> Batch:
        """This process's part of global batch ``step`` of ``epoch``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
        g = epoch * self.steps_per_epoch + step
        r, rv = self._stream(_REAL, g * self.b_real, self.b_real)
        s, sv = self._stream(_SYN, g * self.b_syn, self.b_syn) if self.b_syn else (r[:0], rv[:0])
        w = slice(self.rank, None, self.world)
        return Batch(r[w], rv[w], s[w], sv[w], epoch, step)

    def budget(self, steps: int) -> dict[str, int]:
        """What ``steps`` global steps consume: the numbers two compared runs must share."""
        return {"steps": steps, "batch_size": self.b_real + self.b_syn, "samples": steps * (self.b_real + self.b_syn),
                "real_samples": steps * self.b_real, "synthetic_samples": steps * self.b_syn}

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)



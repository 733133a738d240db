"""What each training step reads: (sample, view) pairs, real:synthetic mixing, and the targets.

Sampling is a pure function of (seed, epoch, step): nothing is carried from one step to the
next, so a resumed run draws exactly the batches an uninterrupted one would, and each process of
a data-parallel run can compute its own slice of the global batch without communication.

- An epoch is one pass over the real samples (the DM-AT convention): each real sample appears
  once, with a view drawn uniformly from its K recorded views. Every batch holds exactly
  ``n_real`` real and ``n_syn`` synthetic samples; the last incomplete batch is dropped so the
  fraction is exact. Synthetic samples come from their own endless stream of shuffled passes.
- ``chunked=True`` makes the order chunk-aware for streaming: the order of the cache's chunks is
  shuffled, then rows are shuffled within windows of a few consecutive chunks, so a reader that
  holds a couple of windows in memory reads every chunk once per pass.

Target readers (``InMemoryTargets``, ``StreamingTargets``) turn (rows, views) into float16 rows of
``features``; ``Prefetcher`` computes upcoming batches in a background thread.
"""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

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
        self.steps_per_epoch = n_real // self.b_real
        self._cache: dict[tuple, np.ndarray] = {}

    def _rng(self, *key: int) -> np.random.Generator:
        return np.random.default_rng([self.seed, *key])

    def _memo(self, key: tuple, make: Callable[[], np.ndarray]) -> np.ndarray:
        if key not in self._cache:
            if len(self._cache) > 8:
                self._cache.clear()
            self._cache[key] = make()
        return self._cache[key]

    def _real_epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        perm = self._memo(("r", epoch), lambda: permutation(self.n_real, self._rng(_REAL, epoch),
                                                             self.chunk_real, self.window))
        views = self._memo(("rv", epoch), lambda: self._rng(_VIEW, _REAL, epoch).integers(0, self.k_real, self.n_real))
        return perm, views

    def _syn_pass(self, p: int) -> tuple[np.ndarray, np.ndarray]:
        perm = self._memo(("s", p), lambda: permutation(self.n_syn, self._rng(_SYN, p), self.chunk_syn, self.window))
        views = self._memo(("sv", p), lambda: self._rng(_VIEW, _SYN, p).integers(0, self.k_syn, self.n_syn))
        return perm, views

    def _syn_slice(self, start: int, count: int) -> tuple[np.ndarray, np.ndarray]:
        """Positions start..start+count of the endless synthetic stream (sample, view)."""
        rows, views = [], []
        pos = start
        while pos < start + count:
            p, off = divmod(pos, self.n_syn)
            take = min(self.n_syn - off, start + count - pos)
            perm, v = self._syn_pass(p)
            rows.append(perm[off:off + take])
            views.append(v[perm[off:off + take]])
            pos += take
        return np.concatenate(rows), np.concatenate(views)

    def batch(self, epoch: int, step: int) -> Batch:
        """This process's part of global batch ``step`` of ``epoch``."""
        if not 0 <= step < self.steps_per_epoch:
            raise IndexError(f"step {step} outside epoch of {self.steps_per_epoch} steps")
        perm, views = self._real_epoch(epoch)
        r = perm[step * self.b_real:(step + 1) * self.b_real][self.rank::self.world]
        rv = views[r]
        if self.b_syn:
            g = (epoch * self.steps_per_epoch + step) * self.b_syn
            s, sv = self._syn_slice(g, self.b_syn)
            s, sv = s[self.rank::self.world], sv[self.rank::self.world]
        else:
            s = sv = np.zeros(0, np.int64)
        return Batch(r, rv, s, sv, epoch, step)

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[Batch]:
        for step in range(start_step, self.steps_per_epoch):
            yield self.batch(epoch, step)


# --- target readers ----------------------------------------------------------------------------
class _Part(Protocol):
    n: int
    k: int
    d: int
    rows_per_chunk: int
    n_chunks: int

    def read_chunk(self, c: int) -> np.ndarray: ...


class InMemoryTargets:
    """All features of a part in RAM (float16), read chunk by chunk once; a gather per batch."""

    def __init__(self, part: _Part, rows: int | None = None) -> None:
        n = part.n if rows is None else min(rows, part.n)
        self.features = np.empty((n, part.k, part.d), np.float16)
        for c in range(-(-n // part.rows_per_chunk)):
            a = c * part.rows_per_chunk
            block = part.read_chunk(c)
            self.features[a:a + len(block)] = block[:n - a]

    def get(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        return self.features[rows, views]


class StreamingTargets:
    """Reads chunks on demand and keeps at most ``capacity`` of them (LRU): memory stays flat.

    With the chunk-aware order from ``permutation`` and capacity >= 2 * window, every chunk is
    read once per pass. Thread-safe enough for one producer thread (the Prefetcher).
    """

    def __init__(self, part: _Part, capacity: int = 8) -> None:
        self.part, self.capacity = part, capacity
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.reads = 0

    def _chunk(self, c: int) -> np.ndarray:
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        block = np.asarray(self.part.read_chunk(c))
        self.reads += 1
        self._chunks[c] = block
        while len(self._chunks) > self.capacity:
            self._chunks.popitem(last=False)
        return block

    def get(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        out = np.empty((len(rows), self.part.d), np.float16)
        chunk_of = rows // self.part.rows_per_chunk
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            out[sel] = self._chunk(int(c))[rows[sel] - c * self.part.rows_per_chunk, views[sel]]
        return out


class Prefetcher:
    """Runs ``make(item)`` for upcoming items in one background thread, ``depth`` items ahead.

    Items are produced in order; an exception in the thread is re-raised in the consumer.
    """

    def __init__(self, items: Iterator[Any], make: Callable[[Any], Any], depth: int = 2) -> None:
        self._q: queue.Queue = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(items, make), daemon=True)
        self._thread.start()

    def _put(self, obj: Any) -> bool:
        while not self._stop.is_set():
            try:
                self._q.put(obj, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self, items: Iterator[Any], make: Callable[[Any], Any]) -> None:
        try:
            for item in items:
                if not self._put((item, make(item))):
                    return
            self._put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the consumer
            self._put(exc)

    def __iter__(self) -> Iterator[tuple[Any, Any]]:
        while True:
            got = self._q.get()
            if got is None:
                return
            if isinstance(got, BaseException):
                raise got
            yield got

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

"""What a training step reads, given the sampler's (row, view) pairs: target readers
(``InMemoryTargets``, ``StreamingTargets``) turn them into float16 rows of ``features``, image
readers (``InMemoryImages``, ``StreamingImages``) rows into uint8 images; the streaming ones read
the cache chunk by chunk through an LRU (``ChunkLRU``), so with the sampler's chunk-aware order
memory stays flat in the number of rows. ``Prefetcher`` computes upcoming batches in a background
thread."""

from __future__ import annotations

import queue
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from typing import Any, Protocol

import numpy as np
import torch


# --- target readers ----------------------------------------------------------------------------
class _Part(Protocol):
    n: int
    k: int
    shape: tuple[int, ...]  # of one target (TargetSpec.shape)
    image_shape: tuple[int, ...]  # (H, W, C) of the stored images
    rows_per_chunk: int
    n_chunks: int

    def read_chunk(self, c: int) -> np.ndarray: ...

    def read_image_chunk(self, c: int) -> np.ndarray: ...


class ChunkLRU:
    """Chunks read on demand, at most ``capacity`` kept (least recently used dropped first).

    With the chunk-aware order from ``permutation`` and capacity >= 2 * window, every chunk is
    read once per pass. Thread-safe enough for one producer thread (the Prefetcher).
    """

    def __init__(self, read_chunk: Callable[[int], np.ndarray], capacity: int) -> None:
        self.read_chunk, self.capacity = read_chunk, capacity
        self._chunks: OrderedDict[int, np.ndarray] = OrderedDict()
        self.reads = 0

    def chunk(self, c: int) -> np.ndarray:
        if c in self._chunks:
            self._chunks.move_to_end(c)
            return self._chunks[c]
        block = np.asarray(self.read_chunk(c))
        self.reads += 1
        self._chunks[c] = block
        while len(self._chunks) > self.capacity:
            self._chunks.popitem(last=False)
        return block

    def gather(self, rows: np.ndarray, rows_per_chunk: int, out: np.ndarray,
               pick: Callable[[np.ndarray, np.ndarray], np.ndarray]) -> np.ndarray:
        """``out[i] = pick(chunk of rows[i], selector)``: one chunk lookup per distinct chunk."""
        chunk_of = rows // rows_per_chunk
        for c in np.unique(chunk_of):
            sel = chunk_of == c
            out[sel] = pick(self.chunk(int(c)), sel)
        return out


class InMemoryTargets:
    """All features of a part in RAM (float16), read chunk by chunk once; a gather per batch."""

    def __init__(self, part: _Part, rows: int | None = None) -> None:
        n = part.n if rows is None else min(rows, part.n)
        self.features = np.empty((n, part.k, *part.shape), np.float16)
        for c in range(-(-n // part.rows_per_chunk)):
            a = c * part.rows_per_chunk
            block = part.read_chunk(c)
            self.features[a:a + len(block)] = block[:n - a]

    def get(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        return self.features[rows, views]


class StreamingTargets(ChunkLRU):
    """Feature chunks read on demand, at most ``capacity`` kept: memory stays flat."""

    def __init__(self, part: _Part, capacity: int = 8) -> None:
        super().__init__(part.read_chunk, capacity)
        self.part = part

    def get(self, rows: np.ndarray, views: np.ndarray) -> np.ndarray:
        rpc = self.part.rows_per_chunk
        out = np.empty((len(rows), *self.part.shape), np.float16)
        return self.gather(rows, rpc, out, lambda block, sel: block[rows[sel] % rpc, views[sel]])


class InMemoryImages:
    """A part's images in RAM: uint8 (n, C, H, W), row i = the image of cache row i."""

    def __init__(self, images: torch.Tensor) -> None:
        self.images = images
        self.shape: tuple[int, ...] = tuple(images.shape[1:])  # (C, H, W)

    def get(self, rows: np.ndarray) -> torch.Tensor:
        return self.images[torch.from_numpy(rows)]


class StreamingImages(ChunkLRU):
    """A part's images read from the cache chunk by chunk: the same chunks, in the same order, as
    the targets of the same rows, so images and targets stream together."""

    def __init__(self, part: _Part, capacity: int = 8) -> None:
        super().__init__(part.read_image_chunk, capacity)
        self.part = part
        h, w, c = part.image_shape
        self.shape = (c, h, w)

    def get(self, rows: np.ndarray) -> torch.Tensor:
        rpc = self.part.rows_per_chunk
        c, h, w = self.shape
        out = np.empty((len(rows), h, w, c), np.uint8)
        self.gather(rows, rpc, out, lambda block, sel: block[rows[sel] % rpc])
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()


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

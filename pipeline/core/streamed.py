"""Splits written and read shard by shard, so that memory holds a few shards, never a split:
``write_split_rows`` (prepare: resumable, several processes) and ``SplitRows`` (extract)."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import signal
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from pathlib import Path

import numpy as np
from tqdm import tqdm

from pipeline.core.errors import UserError
from pipeline.core.shards import (
    FINGERPRINT,
    ContentHash,
    _check_keys_labels,
    _label,
    _prefix_shards,
    _shard_samples,
    content_hash,
    finish_split,
    iter_shards,
    make_fingerprint,
    read_fingerprint,
    shard_name,
    write_shard,
)
from pipeline.core.storage import basename, commit, join, read_bytes, remove, resume, write_bytes


def gather_rows(rows: np.ndarray, n: int, starts: np.ndarray, shape: tuple[int, ...],
                fetch: Callable[[int, np.ndarray], np.ndarray]) -> np.ndarray:
    """uint8 images of row indices ``rows`` (in their order) of ``n`` rows stored in consecutive blocks
    (block i holds rows [starts[i], starts[i + 1])): ``fetch(i, local)`` gives block i's rows ``local``."""
    rows = np.asarray(rows, np.int64)
    if len(rows) and (rows.min() < 0 or rows.max() >= n):
        raise IndexError(f"rows outside [0, {n})")
    out = np.empty((len(rows), *shape), np.uint8)
    which = np.searchsorted(starts, rows, side="right") - 1
    for i in np.unique(which):
        sel = np.flatnonzero(which == i)
        out[sel] = fetch(int(i), rows[sel] - starts[i])
    return out


RECORD_SUFFIX = ".json"  # beside each shard of an unfinished split: its record (what a resumed run keeps)


def _write_shard_job(stage: str, s: int, keys: list[str], images: np.ndarray, labels: np.ndarray,
                     encoding: str = "png") -> dict:
    """One shard and then its record beside it (a worker's job): a shard with a record is finished."""
    record = write_shard(stage, s, keys, images, labels, encoding=encoding)
    write_bytes(join(stage, shard_name(s) + RECORD_SUFFIX), json.dumps(record).encode())
    return record


def _finished_shards(stage: str, bounds: list[tuple[int, int]]) -> dict[int, dict]:
    """Shards of a resumed staging folder whose record is there and whose file matches it."""
    done = {}
    for s, (a, b) in enumerate(bounds):
        raw = read_bytes(join(stage, shard_name(s) + RECORD_SUFFIX))
        if raw is None:
            continue
        try:
            record = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        data = read_bytes(join(stage, shard_name(s)))
        if isinstance(record, dict) and record.get("count") == b - a and data is not None \
                and hashlib.sha256(data).hexdigest() == record.get("sha256"):
            done[s] = record
    return done


def write_split_rows(out_dir: str | Path, *, n: int, image_shape: list[int], classes: list[str],
                     keys: Callable[[int, int], list[str]], labels: np.ndarray,
                     read: Callable[[int, int], np.ndarray], shard_size: int, plan: dict, source: str = "",
                     extra: dict | None = None, workers: int = 1, encoding: str = "png",
                     progress: bool = True) -> dict:
    """Write a split of ``n`` rows shard by shard: ``read(a, b)`` gives the images of rows [a, b)
    (called in increasing order), ``keys(a, b)`` their keys; memory holds a few shards, never the split.

    ``workers`` > 1 encodes and writes whole shards in that many processes (at most two shards
    each in flight). Resumable: the staging folder records ``plan`` (what is being written), each
    finished shard leaves its record beside it, and a run with the same plan keeps every shard whose
    file matches its record (every row is still read once, for the split's content hash). A run
    with another plan starts afresh. Returns the fingerprint, written last (then the folder moves
    into place, as ``write_split``'s does).
    """
    if shard_size <= 0:
        raise UserError(f"shard size must be positive, got {shard_size}")
    stage, resumed = resume(out_dir, signature=(FINGERPRINT,), plan=json.dumps(plan, sort_keys=True).encode())
    bounds = [(a, min(a + shard_size, n)) for a in range(0, n, shard_size)]
    records = _finished_shards(stage, bounds) if resumed else {}
    name = basename(out_dir)
    if records:
        print(f"{name}: resuming: {len(records)} of {len(bounds)} shards were written by an earlier run")
    hasher = ContentHash(keys(a, b) for a, b in bounds)
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                               initializer=signal.signal, initargs=(signal.SIGINT, signal.SIG_IGN)) if workers > 1 else None
    pending: dict[Future, int] = {}
    try:
        with tqdm(total=n, desc=f"write {name}", unit="img", mininterval=2, disable=not progress) as bar:

            def collect(done: set[Future]) -> None:
                for f in done:
                    s = pending.pop(f)
                    records[s] = f.result()  # re-raises a worker's error
                    bar.update(records[s]["count"])

            for s, (a, b) in enumerate(bounds):
                images = read(a, b)
                if images.shape != (b - a, *image_shape):
                    raise ValueError(f"rows {a}..{b}: images {images.shape}, expected {(b - a, *image_shape)}")
                hasher.update(images)
                if s in records and records[s].get("content") == content_hash(keys(a, b), images, labels[a:b]):
                    bar.update(b - a)
                    continue  # finished by an earlier run, from these very rows
                records.pop(s, None)
                if pool is None:
                    records[s] = _write_shard_job(stage, s, keys(a, b), images, labels[a:b], encoding)
                    bar.update(b - a)
                    continue
                while len(pending) >= 2 * workers:
                    collect(wait(pending, return_when=FIRST_COMPLETED).done)
                pending[pool.submit(_write_shard_job, stage, s, keys(a, b), images, labels[a:b], encoding)] = s
            collect(wait(pending).done)
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    shards = [records[s] for s in range(len(bounds))]
    fp = make_fingerprint(n, list(image_shape), list(classes), shards, hasher.finish(labels), source=source,
                          extra=extra)
    for s in range(len(bounds)):  # the records are in the fingerprint now
        remove(join(stage, shard_name(s) + RECORD_SUFFIX))
    finish_split(stage, fp)
    commit(stage, out_dir, signature=(FINGERPRINT,))
    return fp


class SplitRows:
    """A split's first ``limit`` rows (all with 0), read shard by shard: what ``extract`` reads.

    Opening reads every shard once for its keys and labels (checked against its record, pixels not
    decoded); ``images(a, b)`` and ``take(rows)`` then decode only the shards that hold those rows,
    each checked against its record (file and content hash), keeping the last two in memory. So
    memory holds the keys (as bytes), the labels and a few shards, never the split's pixels.
    Attributes as ``ShardSet``'s (``keys``, ``labels``, ``fingerprint``, ``path``), less ``images``.
    """

    CACHED = 2  # decoded shards kept (a row range that crosses a shard boundary needs two)

    def __init__(self, split_dir: str | Path, *, limit: int = 0, verify: bool = True) -> None:
        self.fingerprint = fp = read_fingerprint(split_dir)
        self.path, self.verify = str(split_dir), verify
        self.n, self.shards = _prefix_shards(split_dir, fp, limit, verify)
        keys, labels = [], []
        for shard in self.shards:
            _, samples = _shard_samples(split_dir, shard, verify)
            pairs = [_label(sample, self.path) for sample in samples]
            keys.append(np.array([k for k, _ in pairs], dtype="S"))
            labels.append(np.array([lab for _, lab in pairs], np.int64))
        self.keys = np.concatenate(keys)[:self.n]  # ASCII by check_key: bytes are exact
        self.labels = np.concatenate(labels)[:self.n]
        _check_keys_labels(split_dir, fp, self.keys, self.labels)
        self.starts = np.cumsum([0] + [r["count"] for r in self.shards])
        self.image_shape = tuple(fp["image_shape"])
        self._cache: dict[int, np.ndarray] = {}

    def _shard(self, i: int) -> np.ndarray:
        if i not in self._cache:
            _, block, _ = next(iter_shards(self.path, [self.shards[i]], verify=self.verify))
            if block.shape[1:] != self.image_shape:
                raise UserError(f"{self.path}: images of shape {list(block.shape[1:])}, its fingerprint says "
                                f"{list(self.image_shape)}")
            while len(self._cache) >= self.CACHED:
                self._cache.pop(next(iter(self._cache)))
            self._cache[i] = block
        return self._cache[i]

    def images(self, a: int, b: int) -> np.ndarray:
        """uint8 (b - a, H, W, C): rows [a, b)."""
        return self.take(np.arange(a, b))

    def take(self, rows: np.ndarray) -> np.ndarray:
        """uint8 images of the given row indices, in their order."""
        return gather_rows(rows, self.n, self.starts, self.image_shape, lambda i, local: self._shard(i)[local])

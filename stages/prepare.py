"""Stage `prepare`: a raw dataset -> webdataset shards per split, each with a fingerprint.

Row order: every later subset of a split is a prefix or a range, so a split whose rows are sorted
by label (``pipeline.data.order.label_order``) is refused before anything is written, unless
``--shuffle-seed N`` asks for a stratified shuffled order (every prefix class-balanced). That order,
its seed and whether the source was label-ordered are recorded in the split's fingerprint (the
keys keep each row's source index, so the content hash covers the order). Without the flag a
source in any other order is written exactly as it comes.

Memory: an npz set (the format of generated sets, up to tens of millions of images) is read block
by block, one output shard at a time, and ``--workers N`` processes encode and write whole shards;
memory is bounded by a few shards, not by the set. An interrupted run resumes: the same command
keeps every shard the earlier run finished (``pipeline.core.streamed.write_split_rows``).
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np

from pipeline.core.errors import UserError, check_out
from pipeline.core.shards import FINGERPRINT, check_key, join
from pipeline.core.storage import local_path, refuse_foreign
from pipeline.core.streamed import write_split_rows
from pipeline.data.config import Encoding, PrepareConfig, SourceFormat
from pipeline.data.npz import npz_files
from pipeline.data.order import label_order, stratified_order
from pipeline.data.sources import detect_format, open_rows


def default_name(source: str) -> str:
    stem = Path(source).name.split(".")[0].lower()
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in stem) or "data"


def _ordered_error(source: str, split: str, order: dict, n: int) -> UserError:
    return UserError(
        f"{source} ({split}): rows are sorted by label ({order['label_changes']} label changes in {n} rows, "
        f"a random order has about {order['expected_changes']:.0f}), so every prefix or range a later stage "
        "takes (--limit, --real-limit, evaluate --offset/--n, the probe's split) would hold few classes; "
        "rerun with --shuffle-seed N to write a stratified shuffled order")


def encoding(cfg: PrepareConfig) -> str:
    """The image encoding of the shards: auto is npy for an npz source, png otherwise."""
    if cfg.encoding != Encoding.auto:
        return cfg.encoding.value
    fmt = detect_format(Path(cfg.source)) if cfg.format == SourceFormat.auto else SourceFormat(cfg.format)
    return "npy" if fmt == SourceFormat.npz else "png"


def _source_files(cfg: PrepareConfig) -> list[list]:
    """What a resumed run must find unchanged: each source file's name, size and modification time."""
    root = Path(cfg.source)
    fmt = detect_format(root) if cfg.format == SourceFormat.auto else SourceFormat(cfg.format)
    files = npz_files(root) if fmt == SourceFormat.npz else [p for p in sorted(root.rglob("*")) if p.is_file()]
    return [[str(p), p.stat().st_size, p.stat().st_mtime_ns] for p in files]


def run(cfg: PrepareConfig) -> dict[str, dict]:
    cfg.validate()  # before the source is read
    check_out(cfg.out, folder=True, urls=True)
    shuffle = cfg.shuffle_seed >= 0
    local = local_path(cfg.out)
    scratch = os.path.dirname(os.path.abspath(local)) if local is not None else None
    # a shuffled order is drawn from every row, so the limit then applies to that order
    sources = open_rows(cfg.source, cfg.format, limit=0 if shuffle else cfg.limit, scratch=scratch)
    try:
        return _write(cfg, sources, shuffle)
    finally:
        for src in sources.values():
            src.close()


def _write(cfg: PrepareConfig, sources: dict, shuffle: bool) -> dict[str, dict]:
    orders = {split: label_order(src.all_labels) for split, src in sources.items()}
    for split, order in orders.items():  # before anything is written
        if order["ordered"] and not shuffle:
            raise _ordered_error(str(cfg.source), split, order, len(sources[split].all_labels))
    for split in sources:  # before anything is written: no split folder of someone else's is replaced
        refuse_foreign(join(cfg.out, split), (FINGERPRINT,))
    name = cfg.key_prefix or default_name(cfg.source)
    files = _source_files(cfg)
    enc = encoding(cfg)
    out = {}
    for split, src in sources.items():
        extra = {"split": split, "name": name} | ({"encoding": enc} if enc != "png" else {})
        if shuffle:
            index = stratified_order(src.labels, cfg.shuffle_seed)[:cfg.limit or None]
            labels = src.labels[index]
            extra["order"] = {"shuffle_seed": cfg.shuffle_seed, "method": "stratified",
                              "source_label_ordered": orders[split]["ordered"],
                              "source_label_changes": orders[split]["label_changes"]}
        else:
            index, labels = None, src.labels

        def rows(a: int, b: int, index: np.ndarray | None = index) -> np.ndarray:
            return np.arange(a, b) if index is None else index[a:b]

        def keys(a: int, b: int, rows=rows, split: str = split) -> list[str]:  # index: the row's place in the source
            return [check_key(f"{name}-{split}-{i:07d}") for i in rows(a, b)]

        plan = {"source": str(cfg.source), "files": files, "format": str(cfg.format.value), "split": split,
                "key_prefix": name, "shard_size": cfg.shard_size, "limit": cfg.limit,
                "shuffle_seed": cfg.shuffle_seed, "rows": len(labels), "encoding": enc,
                "labels": hashlib.sha256(np.asarray(labels, np.int64).tobytes()).hexdigest()}
        fp = write_split_rows(join(cfg.out, split), n=len(labels), image_shape=list(src.image_shape),
                              classes=list(src.classes), keys=keys, labels=labels,
                              read=lambda a, b, src=src, rows=rows: src.read(rows(a, b)),
                              shard_size=cfg.shard_size, plan=plan, source=str(cfg.source), extra=extra,
                              workers=cfg.workers, encoding=enc)
        how = f", stratified order (seed {cfg.shuffle_seed})" if shuffle else ""
        print(f"{split}: {fp['count']} samples, shape {fp['image_shape']}, "
              f"{fp['num_classes']} classes{how} -> {join(cfg.out, split)}")
        out[split] = fp
    return out


def interrupted(cfg: PrepareConfig) -> str:
    return (f"{cfg.out} was not finished (a split without its {FINGERPRINT} never reads as complete); rerun the "
            "same command to resume: it keeps every shard already written")

"""Stage `prepare`: a raw dataset -> webdataset shards per split, each with a fingerprint.

Row order: every later subset of a split is a prefix or a range, so a split whose rows are sorted
by label (``pipeline.data.order.label_order``) is refused before anything is written, unless
``--shuffle-seed N`` asks for a stratified shuffled order (every prefix class-balanced). That order,
its seed and whether the source was label-ordered are recorded in the split's fingerprint (the
keys keep each row's source index, so the content hash covers the order). Without the flag a
source in any other order is written exactly as it comes.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import UserError, check_out
from pipeline.core.shards import FINGERPRINT, Split, join, make_keys, write_split
from pipeline.core.storage import refuse_foreign
from pipeline.data.config import PrepareConfig
from pipeline.data.order import label_order, stratified_order
from pipeline.data.sources import is_streamed, read_labels, read_source


def default_name(source: str) -> str:
    stem = Path(source).name.split(".")[0].lower()
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in stem) or "data"


def _ordered_error(source: str, split: str, order: dict, n: int) -> UserError:
    return UserError(
        f"{source} ({split}): rows are sorted by label ({order['label_changes']} label changes in {n} rows, "
        f"a random order has about {order['expected_changes']:.0f}), so every prefix or range a later stage "
        "takes (--limit, --real-limit, evaluate --offset/--n, the probe's split) would hold few classes; "
        "rerun with --shuffle-seed N to write a stratified shuffled order")


def run(cfg: PrepareConfig) -> dict[str, dict]:
    cfg.validate()  # before the source is read
    check_out(cfg.out, folder=True, urls=True)
    shuffle = cfg.shuffle_seed >= 0
    # a streamed source (IDX, npz) is read only as far as --limit, unless the whole split is to be
    # reordered; its order is then judged by all of its labels, read without the images
    prefix_only = bool(cfg.limit) and not shuffle and is_streamed(cfg.source, cfg.format)
    splits = read_source(cfg.source, cfg.format, limit=cfg.limit if prefix_only else 0)
    all_labels = read_labels(cfg.source, cfg.format) if prefix_only else {s: d.labels for s, d in splits.items()}
    orders = {split: label_order(all_labels[split]) for split in splits}
    for split, order in orders.items():  # before anything is written
        if order["ordered"] and not shuffle:
            raise _ordered_error(str(cfg.source), split, order, len(all_labels[split]))
    for split in splits:  # before anything is written: no split folder of someone else's is replaced
        refuse_foreign(join(cfg.out, split), (FINGERPRINT,))
    name = cfg.key_prefix or default_name(cfg.source)
    out = {}
    for split, data in splits.items():
        keys = make_keys(name, split, len(data.labels))  # the index is the row's position in the source
        extra = {"split": split, "name": name}
        if shuffle:
            rows = stratified_order(data.labels, cfg.shuffle_seed)[:cfg.limit or None]
            data = Split(data.images[rows], data.labels[rows], data.classes)
            keys = [keys[i] for i in rows]
            extra["order"] = {"shuffle_seed": cfg.shuffle_seed, "method": "stratified",
                              "source_label_ordered": orders[split]["ordered"],
                              "source_label_changes": orders[split]["label_changes"]}
        elif cfg.limit and not prefix_only:  # read whole (folder, CIFAR): keep the first N here
            data = Split(data.images[:cfg.limit], data.labels[:cfg.limit], data.classes)
            keys = keys[:cfg.limit]
        fp = write_split(join(cfg.out, split), data, keys, shard_size=cfg.shard_size,
                         source=str(cfg.source), extra=extra)
        how = f", stratified order (seed {cfg.shuffle_seed})" if shuffle else ""
        print(f"{split}: {fp['count']} samples, shape {fp['image_shape']}, "
              f"{fp['num_classes']} classes{how} -> {join(cfg.out, split)}")
        out[split] = fp
    return out

"""Stage `prepare`: a raw dataset -> webdataset shards per split, each with a fingerprint."""

from __future__ import annotations

from pathlib import Path

from pipeline.core.errors import check_out
from pipeline.core.shards import FINGERPRINT, join, make_keys, write_split
from pipeline.core.storage import refuse_foreign
from pipeline.data.config import PrepareConfig
from pipeline.data.sources import read_source


def default_name(source: str) -> str:
    stem = Path(source).name.split(".")[0].lower()
    return "".join(c if c.isalnum() or c in "_-" else "-" for c in stem) or "data"


def run(cfg: PrepareConfig) -> dict[str, dict]:
    cfg.validate()  # before the source is read
    check_out(cfg.out, folder=True, urls=True)
    splits = read_source(cfg.source, cfg.format, limit=cfg.limit)
    for split in splits:  # before anything is written: no split folder of someone else's is replaced
        refuse_foreign(join(cfg.out, split), (FINGERPRINT,))
    name = cfg.key_prefix or default_name(cfg.source)
    out = {}
    for split, data in splits.items():
        keys = make_keys(name, split, len(data.labels))
        fp = write_split(join(cfg.out, split), data, keys, shard_size=cfg.shard_size,
                         source=str(cfg.source), extra={"split": split, "name": name})
        print(f"{split}: {fp['count']} samples, shape {fp['image_shape']}, "
              f"{fp['num_classes']} classes -> {join(cfg.out, split)}")
        out[split] = fp
    return out

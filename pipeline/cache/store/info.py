"""Human-readable summaries: ``cache info`` and the linear-probe table."""

from __future__ import annotations

from typing import Any

import numpy as np
from zarr.core.sync import sync

from pipeline.cache.contract import PATHS
from pipeline.cache.diagnostics import diagnosis_lines
from pipeline.cache.store.layout import (
    IMAGES,
    MALFORMED,
    PARTS,
    SMALL_ARRAYS,
    _data_keys,
    _is_part,
    open_group,
    set_path,
)
from pipeline.cache.targets import targets_from_attrs
from pipeline.core.errors import UserError


def _size(store: Any, key: str) -> int:
    try:
        return int(sync(store.getsize(key)))
    except FileNotFoundError:
        return 0


def probe_table(probe: dict) -> list[str]:
    """The linear-probe accuracies of a store's target sets as t x layer rows (a text table)."""
    sets = probe.get("sets") if isinstance(probe, dict) else None
    if not isinstance(sets, list) or not sets:
        return []
    try:
        ts = list(dict.fromkeys(int(r["t"]) for r in sets))
        layers = list(dict.fromkeys(str(r["layer"]) for r in sets))
        acc = {(int(r["t"]), str(r["layer"])): r.get("probe_accuracy") for r in sets}
    except (KeyError, TypeError, ValueError):
        return ["  (malformed probe record)"]
    width = max(12, *(len(name) + 2 for name in layers))
    lines = ["  t \\ layer " + "".join(f"{name:>{width}}" for name in layers)]
    for t in ts:
        cells = (acc.get((t, name)) for name in layers)
        lines.append(f"  {t:<10d}" + "".join(f"{c:>{width}.4f}" if isinstance(c, (int, float)) else f"{'-':>{width}}"
                                             for c in cells))
    return lines


def cache_info(url: str) -> str:
    """A readable summary of a store (complete or not)."""
    group = open_group(str(url), "r")
    a = dict(group.attrs)
    model = a.get("model", {})
    try:
        specs, default = targets_from_attrs(a)
        sets = ", ".join(f"{s.name} {'x'.join(map(str, s.shape))}" for s in specs) + f" (default {default.name})"
    except UserError as exc:
        specs, sets = [], str(exc)
    lines = [f"store:      {url}",
             f"complete:   {a.get('complete', False)}",
             f"digest:     {a.get('digest', '-')} (sha256 of the attributes and the manifest of every file)",
             f"model:      {model.get('source')} (weights sha256 {str(model.get('weights_sha256'))[:16]}...)"
             + (" (paths relative to the store)" if a.get("paths") == PATHS else ""),
             f"extraction: timesteps={a.get('timesteps')} layers={a.get('layers')} pooling={a.get('pooling')} "
             f"draws={a.get('draws')} condition={a.get('condition')} noise={a.get('noise')} seed={a.get('seed')}",
             f"targets:    {sets}",
             f"images:     {a.get('image_size')} px, {a.get('in_channels')} channel(s), "
             f"normalisation {a.get('normalisation')}, views {a.get('view_spec')}"]
    if "probe" in a:
        lines.append("probe:      linear-probe accuracy on the identity view (train rows fit -> held-out train rows), per target set")
        lines += probe_table(a["probe"])
    lines += diagnosis_lines(a.get("diagnostics"))
    total = 0
    for name in [p for p in PARTS if _is_part(group, p)]:
        try:
            g = group[name]
            other = sum(_size(group.store, k) for arr in (g[x] for x in SMALL_ARRAYS if x in g.array_keys())
                        for k in _data_keys(arr))
        except MALFORMED as exc:
            lines.append(f"part {name:9s} unreadable ({type(exc).__name__}: {exc})")
            continue
        total += other
        lines.append(f"part {name:9s} N={g.attrs.get('n')} K={g.attrs.get('k')} "
                     f"compressor={g.attrs.get('compressor')}; per-row arrays {other / 2**20:.2f} MiB")
        if g.attrs.get(IMAGES) is True and IMAGES in g.array_keys():
            im = g[IMAGES]
            disk = sum(_size(group.store, k) for k in _data_keys(im))
            total += disk
            lines.append(f"  {IMAGES:24s} {'x'.join(map(str, im.shape[1:]))} uint8 (streamed with the targets): "
                         f"{disk / 2**20:.2f} MiB on disk, ratio {int(np.prod(im.shape)) / max(disk, 1):.2f}x")
        for spec in specs:
            if set_path(name, spec) not in group:
                lines.append(f"  {spec.name}: missing")
                continue
            try:
                sg = group[set_path(name, spec)]
                f = sg["features"]
                disk = sum(_size(group.store, k) for k in _data_keys(f))
                raw = int(np.prod(f.shape)) * f.dtype.itemsize
                n, k = f.shape[:2]
                done = int((sg["progress"][...].any(axis=1)).sum()) if "progress" in sg.array_keys() else 0
            except MALFORMED as exc:
                lines.append(f"  {spec.name}: unreadable ({type(exc).__name__}: {exc})")
                continue
            total += disk
            lines.append(f"  {spec.name:24s} D={'x'.join(map(str, f.shape[2:]))} {f.dtype} chunks={f.chunks} "
                         f"shards={f.shards} ({done}/{g.attrs.get('n_shards')} written): {disk / 2**20:.2f} MiB "
                         f"on disk, ratio {raw / max(disk, 1):.2f}x, {disk / max(n * k, 1):.1f} B/view")
    lines.append(f"total:      {total / 2**20:.2f} MiB of data files")
    return "\n".join(lines)

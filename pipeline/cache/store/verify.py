"""Integrity of a store from a stranger: every file against the manifest, the digest, shapes, NaN/inf
scan (``verify_cache``), and the cheaper re-check before a resumed run (``recheck_cache``)."""

from __future__ import annotations

import math

import numpy as np
import zarr

from pipeline.cache.store.checks import _open_for_check, _part_problems, check_digest_value
from pipeline.cache.store.layout import (
    MALFORMED,
    PARTS,
    ROOT_META,
    _data_keys,
    _is_part,
    _list_keys,
    _regular_file_raw,
    _sha,
    attrs_digest,
    set_path,
)
from pipeline.cache.targets import targets_from_attrs
from pipeline.core.errors import UserError
from pipeline.core.views import record_problem, spec_from_dict


def _scan_finite(g: zarr.Group) -> list[str]:
    """Non-finite values in the features and mean/std of one target set (group ``g``).

    Read one chunk at a time: a whole shard decoded at once costs several times its raw size in
    peak memory (zarr's decode threads), and this scan runs in every training process.
    """
    problems, unreadable = [], set()
    feats = g["features"]
    rows_shard, rows_chunk = (feats.shards or feats.chunks)[0], feats.chunks[0]
    keys = _data_keys(feats)
    for a in range(0, feats.shape[0], rows_chunk):
        s = a // rows_shard
        if s in unreadable:
            continue
        try:
            x = feats[a:a + rows_chunk]
        except Exception as exc:  # a corrupted shard fails in the codec, whatever its type
            problems.append(f"{keys[s]}: unreadable ({type(exc).__name__}: {exc})")
            unreadable.add(s)
            continue
        bad = ~np.isfinite(x)
        if bad.any():
            rows = np.unique(np.nonzero(bad)[0])[:5] + a
            problems.append(f"{keys[s]}: {int(bad.sum())} NaN/Inf values (rows {', '.join(map(str, rows))}...)")
    for key in ("mean", "std"):
        try:
            if not np.isfinite(g[key][...]).all():
                problems.append(f"{g.path}/{key}: NaN/Inf values")
        except Exception as exc:
            problems.append(f"{g.path}/{key}: unreadable ({type(exc).__name__})")
    return problems


def _grid_problems(g: zarr.Group, manifest: dict) -> list[str]:
    """Arrays whose shape needs more (or fewer) shard files than the manifest lists: extraction
    writes every shard (empty chunks too), so a store claiming 10^9 rows is caught here, from
    metadata alone, before any row is read or allocated."""
    problems = []
    try:
        for _, arr in g.members(max_depth=None):
            if not isinstance(arr, zarr.Array):
                continue
            grid = math.prod(-(-s // c) for s, c in zip(arr.shape, arr.shards or arr.chunks))
            held = sum(1 for k in manifest if k.startswith(f"{arr.path}/c/"))
            if grid != held:
                problems.append(f"{arr.path}: shape {tuple(arr.shape)} needs {grid} shard file(s), the store "
                                f"holds {held}")
    except MALFORMED as exc:
        problems.append(f"{g.path}: unreadable part ({type(exc).__name__}: {exc})")
    return problems


def _in_scope(key: str, parts: tuple[str, ...] | None) -> bool:
    return parts is None or "/" not in key or key.split("/", 1)[0] in parts


def _check_manifest(group: zarr.Group, attrs: dict, parts: tuple[str, ...] | None,
                    digest: str | None) -> list[str]:
    """Every listed file in the manifest with its checksum, every entry present, the digest right."""
    manifest = attrs.get("manifest")
    if not isinstance(manifest, dict) or not all(isinstance(v, str) for v in manifest.values()):
        return ["no manifest of the store's files (a cache must list every file's sha256)"]
    problems = []
    if attrs.get("digest") != attrs_digest(attrs):
        problems.append("root attributes changed after extraction (digest mismatch)")
    if digest is not None and attrs.get("digest") != digest:
        problems.append(f"digest {attrs.get('digest')} is not the expected {digest}")
    listed = [k for k in _list_keys(group.store) if k != ROOT_META]
    for key in listed:
        if not _in_scope(key, parts):
            continue
        if key not in manifest:
            problems.append(f"{key}: file not in the manifest (added or renamed after extraction)")
            continue
        try:
            got = _sha(_regular_file_raw(group.store, key))
        except UserError as exc:
            problems.append(str(exc))
            continue
        if got != manifest[key]:
            problems.append(f"{key}: checksum mismatch (corrupted, truncated or edited)")
    present = set(listed)
    problems += [f"{key}: missing file" for key in manifest if key not in present and _in_scope(key, parts)]
    return problems


def _opened(url: str) -> tuple[zarr.Group | None, dict, list[str]]:
    """(group, root attributes, []) of a store fit to check, or (None, {}, [why not])."""
    try:
        group, attrs, problem = _open_for_check(url)
    except UserError as exc:
        return None, {}, [str(exc)]
    return group, attrs, [problem] if problem else []


def verify_cache(url: str, *, parts: tuple[str, ...] | None = None, digest: str | None = None) -> list[str]:
    """Every problem of a store, one line each: completeness, manifest and digest, shapes, NaN/Inf.

    ``parts`` limits the file, shape and NaN checks to those parts and the top-level metadata
    (``train`` checks only what it will read); None checks the whole store. ``digest``, when
    given, must be the store's (a digest obtained through a trusted channel).
    """
    if digest is not None:
        check_digest_value(digest)
    group, attrs, problems = _opened(url)
    if problems:
        return problems
    if attrs.get("complete") is not True:
        problems.append("incomplete: no \"complete\" marker (extract did not finish)")
    else:
        problems += _check_manifest(group, attrs, parts, digest)
    if problems:  # shapes and values only of files the manifest vouches for
        return problems
    try:
        specs, _ = targets_from_attrs(attrs)
    except UserError as exc:
        return [str(exc)]
    try:
        view_spec = spec_from_dict(attrs.get("view_spec"))
    except UserError as exc:
        return [str(exc)]
    for name in [p for p in PARTS if _is_part(group, p) and (parts is None or p in parts)]:
        shape_problems = _grid_problems(group[name], attrs["manifest"]) or _part_problems(name, group[name], specs)
        if not shape_problems:
            views = {k: group[name][k][...] for k in ("dx", "dy", "flip")}
            shape_problems = [f"{name}: view records: {p}" for p in [record_problem(views, view_spec)] if p]
        problems += shape_problems or [p for spec in specs
                                       for p in _scan_finite(group[set_path(name, spec)])]
    if not any(_is_part(group, p) for p in PARTS):
        problems.append("no parts (train, synthetic, test) in the store")
    return problems


def recheck_cache(url: str, *, parts: tuple[str, ...], digest: str) -> list[str]:
    """A store verified earlier, checked again (a streaming run, at every checkpoint): the same
    digest, and every file of ``parts`` present and with its manifest checksum. No decoding."""
    group, attrs, problems = _opened(url)
    return problems or _check_manifest(group, attrs, parts, digest)

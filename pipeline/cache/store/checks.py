"""What a store must look like before anything reads it: its format, its root, each part's layout
and shapes (used by the reader when it opens a part and by ``verify``)."""

from __future__ import annotations

import json

import zarr

from pipeline.cache.contract import PartRecord
from pipeline.cache.store.layout import FORMAT, IMAGES, MALFORMED, OLD_FORMATS, ROOT_META, _raw, open_group
from pipeline.cache.targets import TargetSpec
from pipeline.core.errors import UserError


def _open_for_check(url: str) -> tuple[zarr.Group, dict, str | None]:
    """The group, its root attributes and the first problem of its format or root file (None when
    neither has one): what opening, verifying and re-checking a store all start with."""
    group = open_group(str(url), "r")
    attrs = dict(group.attrs)
    return group, attrs, _format_problem(attrs) or _root_problem(group)


# -- reading -------------------------------------------------------------------------------------
def _layout_problems(name: str, g: zarr.Group, specs: list[TargetSpec]) -> list[str]:
    """The part's attributes, its target sets and their chunking make sense (checked before
    anything is read by them)."""
    try:
        try:
            rec = PartRecord.from_attrs(dict(g.attrs), name)
        except UserError as exc:
            return [str(exc)]
        ints = {"n": rec.n, "k": rec.k, "rows_per_chunk": rec.rows_per_chunk, "rows_per_shard": rec.rows_per_shard}
        held = sorted(g["targets"].group_keys()) if "targets" in g.group_keys() else []
        if held != sorted(s.name for s in specs):
            return [f"{name}: holds target sets {held}, the cache's specification lists "
                    f"{sorted(s.name for s in specs)}"]
        for spec in specs:
            f = g["targets"][spec.name]["features"]
            if tuple(f.shape) != spec.array_shape(ints["n"], ints["k"]) or min(f.chunks) < 1 \
                    or min(f.shards or f.chunks) < 1:
                return [f"{name}/targets/{spec.name}/features: shape {f.shape} or chunks {f.chunks} do not match "
                        f"N={ints['n']}, K={ints['k']}, target shape {list(spec.shape)}"]
            if (f.chunks[0], (f.shards or f.chunks)[0]) != (ints["rows_per_chunk"], ints["rows_per_shard"]):
                return [f"{name}: attributes say {ints['rows_per_chunk']}/{ints['rows_per_shard']} rows per "
                        f"chunk/shard, the features of {spec.name} {f.chunks[0]}/{(f.shards or f.chunks)[0]}"]
        if rec.images:
            im = g[IMAGES]
            want = [ints["n"], *(rec.fingerprint.image_shape or [])]
            if list(im.shape) != want or len(want) != 4 or str(im.dtype) != "uint8" \
                    or tuple(im.chunks) != (ints["rows_per_chunk"], *im.shape[1:]) \
                    or tuple(im.shards or im.chunks) != (ints["rows_per_shard"], *im.shape[1:]):
                return [f"{name}/{IMAGES}: {im.dtype} shape {im.shape}, chunks {im.chunks}, shards {im.shards} do "
                        f"not match uint8 {want} in chunks/shards of {ints['rows_per_chunk']}/"
                        f"{ints['rows_per_shard']} rows"]
    except MALFORMED as exc:
        return [f"{name}: unreadable part ({type(exc).__name__}: {exc})"]
    return []


def _part_problems(name: str, g: zarr.Group, specs: list[TargetSpec]) -> list[str]:
    """Layout first (attributes, sets, chunking), then array shapes: what a part must pass before it is read."""
    return _layout_problems(name, g, specs) or _check_shapes(name, g, specs)


ROOT_KEYS = {"zarr_format": 3, "node_type": "group"}  # and "attributes": all a root zarr.json may hold


def _root_problem(group: zarr.Group) -> str | None:
    """The root zarr.json holds the attributes (covered by the digest) and zarr's two fixed fields,
    nothing else: so the digest vouches for the whole file. A ``consolidated_metadata`` block (array
    metadata that zarr would read instead of each array's checksummed file) is refused."""
    try:
        meta = json.loads(_raw(group.store, ROOT_META) or b"null")
    except (ValueError, UnicodeDecodeError):
        return f"{ROOT_META}: not JSON"
    if not isinstance(meta, dict):
        return f"{ROOT_META}: not a JSON object"
    extra = sorted(set(meta) - set(ROOT_KEYS) - {"attributes"})
    if extra:
        return (f"{ROOT_META} holds {', '.join(map(repr, extra))}, which extraction never writes and the digest "
                "does not cover (array metadata is read only from each array's own checksummed file)")
    if any(meta.get(k) != v for k, v in ROOT_KEYS.items()):
        return f"{ROOT_META}: not a zarr v3 group"
    return None


def check_digest_value(digest: str) -> str:
    """A digest given by a user: 64 lowercase hex digits, never empty (an empty value is not "no digest")."""
    if not isinstance(digest, str) or len(digest) != 64 or any(c not in "0123456789abcdef" for c in digest):
        raise UserError(f"--digest {digest!r}: expected the 64 hex digits `cache info` prints (sha256)")
    return digest


def _format_problem(attrs: dict) -> str | None:
    fmt = attrs.get("format")
    if fmt in OLD_FORMATS:
        return (f"format {fmt} is no longer read ({OLD_FORMATS[fmt]}): rebuild the cache with "
                "`python -m pipeline extract` (same flags, another --out)")
    if fmt != FORMAT:
        return f"not a feature cache of format {FORMAT} (format: {fmt!r})"
    return None


# -- verify and info -----------------------------------------------------------------------------
def _check_shapes(name: str, g: zarr.Group, specs: list[TargetSpec]) -> list[str]:
    """Shapes of the per-row arrays and of every set's statistics and resume record (the layout,
    N and K, already checked)."""
    problems = []
    try:
        a = g.attrs
        n, k, n_shards = a["n"], a["k"], a["n_shards"]
        want = {"keys": (n,), "labels": (n,), "dx": (n, k), "dy": (n, k), "flip": (n, k), "noise_seed": (n, k)}
        if a.get(IMAGES):
            want["images_progress"] = (n_shards, 32)
        arrays = {key: g for key in want}
        for spec in specs:
            sg = g["targets"][spec.name]
            for key, shape in (("mean", spec.shape), ("std", spec.shape), ("progress", (n_shards, 32))):
                want[f"targets/{spec.name}/{key}"], arrays[f"targets/{spec.name}/{key}"] = shape, sg
        for key, shape in want.items():
            holder, leaf = arrays[key], key.rsplit("/", 1)[-1]
            if leaf not in holder.array_keys():
                problems.append(f"{name}/{key}: missing array")
            elif tuple(holder[leaf].shape) != shape:
                problems.append(f"{name}/{key}: shape {tuple(holder[leaf].shape)}, expected {shape}")
    except MALFORMED as exc:
        problems.append(f"{name}: unreadable part ({type(exc).__name__}: {exc})")
    return problems

"""The cache contract as types: what a store's root and each part record, validated once.

``extract`` builds a ``CachePlan`` (every root attribute known before any feature is computed) and a
``PartRecord`` per part; the writer stores ``to_attrs()``; a reader gets ``CacheMeta.from_attrs``
(the plan plus what finalisation adds: probe, diagnostics, manifest, digest) and ``PartRecord.from_attrs``,
so no consumer reads the store by string key. Anything malformed is one ``UserError`` line naming
the field. The attribute names and their JSON form are the format's (docs/sharing.md); ``to_attrs``
writes them in the order extraction always has, so a store's files do not change with this module.

``timesteps`` and ``layers`` are derived from the target sets (t-major, as extracted); the store
also carries them as attributes for readers of the format, and ``from_attrs`` refuses a store whose
two records disagree.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from pipeline.cache.targets import Pooling, TargetSpec, targets_from_attrs
from pipeline.core.errors import UserError
from pipeline.core.views import ViewSpec, spec_from_dict

PATHS = "relative-to-store"  # root attribute ``paths``: recorded relative paths start at the store
NORMALISATION = "x*2-1"  # images in [0, 1] are fed to the UNet as [-1, 1]
NOISE = "shared-across-timesteps"  # one noise draw per (image, view), used at every timestep


class Condition(str, Enum):
    """The class conditioning a store's targets were extracted with (extract --condition)."""

    null = "null"  # the null class (label dropout index): no label information leaks
    label = "label"  # the true label (leaks the label into the embedding; for ablations)
    none = "none"  # unconditional model: no class_labels at all


def _bad(where: str, what: object) -> UserError:
    return UserError(f"malformed {where} in the cache: {str(what)[:200]}")


def _int(v: object, *, minimum: int | None = None) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and (minimum is None or v >= minimum)


def _opt_str(v: object) -> bool:
    return v is None or isinstance(v, str)


@dataclass(frozen=True)
class ModelRecord:
    """The diffusion model a store was made with (root attribute ``model``)."""

    source: str  # a folder relative to the store (``./`` or ``../``), an absolute path, a URL or a hub id
    weights_sha256: str | None = None
    num_classes: int | None = None
    null_class: int | None = None
    bundled_from: str | None = None  # set when the store holds the model (``./model``, extract --bundle-model)

    def to_attrs(self) -> dict[str, Any]:
        out = {"source": self.source, "weights_sha256": self.weights_sha256, "num_classes": self.num_classes,
               "null_class": self.null_class}
        return out | ({"bundled": True, "bundled_from": self.bundled_from} if self.bundled_from is not None else {})

    @classmethod
    def from_attrs(cls, a: object) -> ModelRecord:
        if not isinstance(a, dict) or not isinstance(a.get("source"), str) or not a["source"] \
                or not _opt_str(a.get("weights_sha256")) or not _opt_str(a.get("bundled_from")) \
                or any(a.get(k) is not None and not _int(a.get(k), minimum=0) for k in ("num_classes", "null_class")) \
                or (a.get("bundled") is True) != (a.get("bundled_from") is not None):
            raise _bad("model record", a)
        return cls(a["source"], a.get("weights_sha256"), a.get("num_classes"), a.get("null_class"), a.get("bundled_from"))


@dataclass(frozen=True)
class Fingerprint:
    """What a part records of the image split it was made from (``core/shards.py`` writes it)."""

    content_hash: str | None = None
    count: int | None = None
    shards_digest: str | None = None
    image_shape: tuple[int, ...] | None = None  # (H, W, C)
    num_classes: int | None = None

    @classmethod
    def of_split(cls, fp: Mapping) -> Fingerprint:
        """The record of a split's full fingerprint (the keys a part keeps)."""
        shape = fp.get("image_shape")
        return cls(fp.get("content_hash"), fp.get("count"), fp.get("shards_digest"),
                   None if shape is None else tuple(int(x) for x in shape), fp.get("num_classes"))

    def to_attrs(self) -> dict[str, Any]:
        return {"content_hash": self.content_hash, "count": self.count, "shards_digest": self.shards_digest,
                "image_shape": None if self.image_shape is None else list(self.image_shape),
                "num_classes": self.num_classes}

    @classmethod
    def from_attrs(cls, a: object) -> Fingerprint:
        shape = a.get("image_shape") if isinstance(a, dict) else None
        if not isinstance(a, dict) or not _opt_str(a.get("content_hash")) or not _opt_str(a.get("shards_digest")) \
                or any(a.get(k) is not None and not _int(a.get(k), minimum=0) for k in ("count", "num_classes")) \
                or (shape is not None and (not isinstance(shape, list) or not all(_int(s, minimum=1) for s in shape))):
            raise _bad("image split fingerprint", a)
        return cls.of_split(a)

    def matches(self, theirs: Mapping) -> bool:
        """The split whose fingerprint is ``theirs`` is the one this part was made from."""
        return (self.content_hash, self.count, self.shards_digest) == \
            (theirs.get("content_hash"), theirs.get("count"), theirs.get("shards_digest"))


@dataclass(frozen=True)
class PartPlan:
    """A part's entry in the root ``parts``: its size and data (a resume on other images is refused)."""

    n: int
    k: int
    content_hash: str | None

    def to_attrs(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k, "content_hash": self.content_hash}


@dataclass(frozen=True)
class CachePlan:
    """Every root attribute known before extraction computes a feature; a store is resumed only
    under the same plan. ``targets[0]`` is the default set unless ``default`` names another."""

    model: ModelRecord
    targets: tuple[TargetSpec, ...]
    image_size: int
    in_channels: int
    view_spec: ViewSpec
    pooling: Pooling = Pooling.mean
    draws: int = 1
    condition: str = "null"
    seed: int = 0
    code_version: str = ""
    compressor: str = "blosc-zstd"
    images: bool = True
    parts: dict[str, PartPlan] = field(default_factory=dict)
    default: str | None = None  # the default set's name (None: the first)
    paths: str | None = PATHS  # None: a store from before relative paths (paths read as recorded)

    @property
    def default_target(self) -> TargetSpec:
        name = self.default or self.targets[0].name
        return next(s for s in self.targets if s.name == name)

    @property
    def timesteps(self) -> list[int]:
        return list(dict.fromkeys(s.t for s in self.targets))

    @property
    def layers(self) -> list[str]:
        return list(dict.fromkeys(s.layer for s in self.targets))

    def to_attrs(self) -> dict[str, Any]:
        """The root attributes, in extraction's order (the JSON form: lists, not tuples)."""
        targets = {"targets": [s.to_attrs() for s in self.targets], "default_target": self.default_target.name}
        return {**({"paths": self.paths} if self.paths is not None else {}), "model": self.model.to_attrs(),
                "timesteps": self.timesteps, "layers": self.layers, "pooling": self.pooling.value, "draws": self.draws,
                "condition": self.condition, "noise": NOISE, **targets, "image_size": self.image_size,
                "in_channels": self.in_channels, "normalisation": NORMALISATION, "view_spec": self.view_spec.to_dict(),
                "seed": self.seed, "code_version": self.code_version, "compressor": self.compressor,
                "images": self.images, "parts": {n: p.to_attrs() for n, p in self.parts.items()}}

    @classmethod
    def from_attrs(cls, a: Mapping) -> CachePlan:
        """The one validation of a store's root attributes (each problem is one UserError line)."""
        specs, default = targets_from_attrs(dict(a))
        plan_targets = tuple(specs)
        ts, layers = list(dict.fromkeys(s.t for s in specs)), list(dict.fromkeys(s.layer for s in specs))
        if a.get("timesteps") != ts or a.get("layers") != layers:
            raise _bad("root attributes", f"timesteps {a.get('timesteps')} / layers {a.get('layers')} disagree "
                       f"with the target sets' {ts} / {layers}")
        try:
            pooling = Pooling(a.get("pooling"))
        except ValueError:
            raise _bad("pooling", a.get("pooling")) from None
        if any(s.pooling is not pooling for s in specs):
            raise _bad("root attributes", f"pooling {pooling.value} disagrees with the target sets'")
        if a.get("normalisation") != NORMALISATION:
            raise UserError(f"unknown normalisation {a.get('normalisation')!r} in the cache (this version reads "
                            f"{NORMALISATION!r})")
        checks = {"image_size": _int(a.get("image_size"), minimum=1), "in_channels": _int(a.get("in_channels"), minimum=1),
                  "draws": _int(a.get("draws"), minimum=1), "seed": _int(a.get("seed")),
                  "condition": a.get("condition") in {c.value for c in Condition}, "noise": a.get("noise") == NOISE,
                  "code_version": isinstance(a.get("code_version"), str),
                  "compressor": isinstance(a.get("compressor"), str), "images": isinstance(a.get("images"), bool),
                  "paths": a.get("paths") in (None, PATHS), "parts": isinstance(a.get("parts"), dict)}
        bad = [k for k, ok in checks.items() if not ok]
        if bad:
            raise _bad(f"root attribute {bad[0]!r}", a.get(bad[0]))
        parts = {}
        for name, p in a["parts"].items():
            if not isinstance(p, dict) or not _int(p.get("n"), minimum=1) or not _int(p.get("k"), minimum=1) \
                    or not _opt_str(p.get("content_hash")):
                raise _bad(f"root record of part {str(name)[:40]!r}", p)
            parts[str(name)] = PartPlan(p["n"], p["k"], p.get("content_hash"))
        return cls(ModelRecord.from_attrs(a.get("model")), plan_targets, a["image_size"], a["in_channels"],
                   spec_from_dict(a.get("view_spec")), pooling, a["draws"], a["condition"], a["seed"],
                   a["code_version"], a["compressor"], a["images"], parts, default.name, a.get("paths"))


@dataclass(frozen=True)
class CacheMeta:
    """A finished store's root: its plan and what finalisation added."""

    plan: CachePlan
    digest: str
    manifest: dict[str, str]
    probe: dict | None = None  # the linear probe of every target set (cache/build.py: compute_probe)
    diagnostics: dict | None = None  # the target sets' information figures (cache/diagnostics.py)

    @classmethod
    def from_attrs(cls, a: Mapping) -> CacheMeta:
        if not isinstance(a.get("digest"), str) or not isinstance(a.get("manifest"), dict):
            raise _bad("root attributes", "no digest or manifest")
        probe, diag = a.get("probe"), a.get("diagnostics")
        return cls(CachePlan.from_attrs(a), a["digest"], a["manifest"], probe if isinstance(probe, dict) else None,
                   diag if isinstance(diag, dict) else None)


@dataclass(frozen=True)
class PartRecord:
    """A part group's attributes: where its images came from, how its views were drawn, and its
    layout (rows per chunk and per shard: the reader's and the writer's units)."""

    shards: str  # the image split, as recorded (relative to the store where the root says so); "" if none
    fingerprint: Fingerprint
    view_seed: int | None
    view_mode: str | None  # "all", "uniform", or None (identity-first: view 0 is the identity)
    n: int = 0
    k: int = 0
    rows_per_chunk: int = 0
    rows_per_shard: int = 0
    n_shards: int = 0
    compressor: str = ""
    images: bool = False

    def to_attrs(self) -> dict[str, Any]:
        """The attributes known before the layout (``extract``'s part record); the writer adds the layout."""
        mode = {"views": "all"} if self.view_mode == "all" else {"view_draw": "uniform"} if self.view_mode else {}
        return {"shards": self.shards, "fingerprint": self.fingerprint.to_attrs(),
                **({"view_seed": self.view_seed} if self.view_seed is not None else {}), **mode}

    def layout_attrs(self) -> dict[str, Any]:
        return {"n": self.n, "k": self.k, "rows_per_chunk": self.rows_per_chunk, "rows_per_shard": self.rows_per_shard,
                "n_shards": self.n_shards, "compressor": self.compressor, "images": self.images}

    @classmethod
    def from_attrs(cls, a: Mapping, name: str = "part") -> PartRecord:
        ints = {k: a.get(k) for k in ("n", "k", "rows_per_chunk", "rows_per_shard", "n_shards")}
        if not all(_int(v, minimum=1) for v in ints.values()):
            raise UserError(f"{name}: malformed attributes {ints} (positive integers expected)")
        if a.get("images") is not None and not isinstance(a.get("images"), bool):
            raise UserError(f"{name}: malformed attribute images={str(a.get('images'))[:40]!r} (true or false expected)")
        if not isinstance(a.get("shards", ""), str) or (a.get("view_seed") is not None and not _int(a.get("view_seed"))):
            raise _bad(f"record of part {name!r}", {k: a.get(k) for k in ("shards", "view_seed")})
        mode = "all" if a.get("views") == "all" else "uniform" if a.get("view_draw") == "uniform" else None
        return cls(a.get("shards", ""), Fingerprint.from_attrs(a.get("fingerprint", {})), a.get("view_seed"), mode,
                   compressor=str(a.get("compressor", "")), images=a.get("images") is True, **ints)

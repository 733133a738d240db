"""What every stage's config shares: enum coercion and range checks in one place per config.

Each stage keeps its defaults in its own area (``pipeline/<area>/config.py``): one frozen
dataclass, whose fields the CLI turns into flags (enums become ``--help`` choices, each field's
``# comment`` its help line: ``field_help``) and whose ``validate()`` holds every range check of
that stage. Nothing deeper in the library reads YAML or
the environment. Paths are strings so that fsspec URLs (``s3://``, ``memory://``) pass through.
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import textwrap
import tokenize
import typing
from enum import Enum

from pipeline.core.errors import UserError, refuse_non_finite


def flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def coerce_enums(cfg: object) -> None:
    """Turn strings given for enum-typed fields into the enum (frozen dataclasses included);
    an unknown value is one ``UserError`` line listing the choices."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):  # type: ignore[arg-type]
        typ, value = hints[f.name], getattr(cfg, f.name)
        if isinstance(typ, type) and issubclass(typ, Enum) and not isinstance(value, typ):
            try:
                object.__setattr__(cfg, f.name, typ(value))
            except ValueError:
                raise UserError(f"{flag(f.name)} {value!r}: choose one of "
                                f"{', '.join(m.value for m in typ)}") from None


def parse_float(value: object) -> float:
    """The value of a float flag: a number (``0.1``, ``1e-3``) or a fraction ``a/b`` of two numbers
    (``--eps 8/255``, the way perturbation sizes are written). Anything else raises ValueError
    with a message for the user; finiteness is ``require``'s check."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    text = str(value).strip()
    try:
        if "/" in text:
            num, den = text.split("/", 1)
            return float(num) / float(den)
        return float(text)
    except (ValueError, ZeroDivisionError):
        raise ValueError(f"{value!r} is not a number or a fraction a/b (such as 0.03 or 8/255)") from None


def comma_tuple(value: object, item: type, name: str) -> tuple:
    """The value of a tuple field: a tuple or list, one value, or a comma list ("10,100"), as a
    tuple of ``item``; an empty entry, a bool, a float or a word where a number belongs is one
    ``UserError`` line naming the flag. The CLI and a config given in code both parse through it."""
    values = list(value) if isinstance(value, (list, tuple)) else str(value).replace(" ", "").split(",")
    try:
        if any(isinstance(v, (bool, float)) or str(v) == "" for v in values):
            raise ValueError
        return tuple(item(v) for v in values)
    except ValueError:
        kind = "integers" if item is int else "names" if item is str else item.__name__
        raise UserError(f"{flag(name)} must be one value or a comma list of {kind}, got {value!r}") from None


MAX_SEED = 2**31  # seeds are combined with ranks and indices (seed * 1000003 + rank) below 2**63


def require(cfg: object, checks: list[tuple[bool, str]]) -> None:
    """Every float of ``cfg`` finite, then the first failed (condition, message) pair becomes one
    ``UserError`` line."""
    refuse_non_finite(cfg)
    seed = getattr(cfg, "seed", 0)
    if type(seed) is int and not 0 <= seed < MAX_SEED:  # numpy refuses negative seeds mid-run
        raise UserError(f"--seed must be in [0, {MAX_SEED}), got {seed}")
    for ok, msg in checks:
        if not ok:
            raise UserError(msg)


@functools.cache
def field_help(cls: type) -> dict[str, str]:
    """Each field's (or enum member's) description, read from the class source: its trailing
    ``# comment``, then the ``#`` lines right above it (context for it and, often, the next ones). The config file is the one place a flag is
    described; ``--help`` shows this text."""
    src = textwrap.dedent(inspect.getsource(cls))
    comments, own_line = {}, set()
    for tok in tokenize.generate_tokens(io.StringIO(src).readline):
        if tok.type == tokenize.COMMENT:
            comments[tok.start[0]] = tok.string.lstrip("#").strip()
            if not tok.line[:tok.start[1]].strip():
                own_line.add(tok.start[0])
    out = {}
    for node in ast.parse(src).body[0].body:  # type: ignore[attr-defined]
        target = node.target if isinstance(node, ast.AnnAssign) else (node.targets[0] if isinstance(
            node, ast.Assign) and len(node.targets) == 1 else None)
        if not isinstance(target, ast.Name):
            continue
        above, line = [], node.lineno - 1
        while line in own_line:
            above.insert(0, comments[line])
            line -= 1
        end = node.end_lineno or node.lineno
        trailing = [comments[end]] if end in comments and end not in own_line else []
        out[target.id] = "; ".join(t for t in (*trailing, " ".join(above)) if t)
    return out

"""The one exception type for user errors, and the output-path check every stage makes first.

Anything raised as ``UserError`` is printed by the CLI as a single line (no traceback) and the
process exits with status 2. Bugs stay ordinary exceptions, with their traceback.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any


class UserError(Exception):
    """Bad input, a missing file, a refused cache: something the user can fix."""


def refuse_non_finite(cfg: Any, prefix: str = "") -> None:
    """Every float setting of a config (nested dataclasses too) must be finite.

    Important: ``nan`` fails every comparison, so ``if x < 0: refuse`` lets it through, and ``inf``
    passes ``x > 0``; a NaN learning rate then trains a NaN model that is saved as finished.
    """
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            refuse_non_finite(value, f"{prefix}{f.name}-")
        elif isinstance(value, float) and not math.isfinite(value):
            raise UserError(f"--{prefix}{f.name}".replace("_", "-") + f" must be a finite number, got {value}")


def check_out(path: str, *, folder: bool, flag: str = "--out", urls: bool = False) -> None:
    """Refuse an output path that cannot be written, before any work is done.

    Important: without this, a stage whose ``--out`` is an existing file (or lies under one)
    runs to the end and only then fails on the rename, with a traceback. fsspec URLs pass only
    where the stage writes through fsspec (``urls``); elsewhere pathlib would write
    ``s3://bucket/run`` into a local folder named ``s3:``, so they are refused.
    """
    if not path:
        raise UserError(f"{flag} is empty")
    if "://" in str(path):
        if not urls:
            raise UserError(f"{flag} {path}: this stage writes local files only; give a local path "
                            "(and copy the result to the URL afterwards)")
        from pipeline.core.storage import url_fs  # lazy: storage imports this module

        url_fs(path)  # an unknown scheme or a missing back-end: one line, before any work
        return
    p = Path(path)
    if folder and p.exists() and not p.is_dir():
        raise UserError(f"{flag} {p}: exists and is a file, not a folder")
    if not folder and p.is_dir():
        raise UserError(f"{flag} {p}: is a folder; give a file name")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise UserError(f"{flag} {p}: {parent} is a file, not a folder")
            break

"""Files and folders on a local path or any fsspec URL (``memory://``, ``file://``, ``s3://``, ...).

Stage outputs appear complete or not at all. A local folder is written as the sibling ``OUT.tmp``
and renamed into place (one atomic rename). Object stores have no rename: there OUT itself is
cleared first and written in place, and each format marks completeness by writing its marker
file last (``fingerprint.json`` for shards, ``generate.json`` for generate's folder), which
readers require.
"""

from __future__ import annotations

import os
import posixpath
import shutil
from pathlib import Path

import fsspec


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def join(base: str | Path, *names: str) -> str:
    """``base/name/...`` for a local path or a URL (``Path`` would fold ``s3://b`` into ``s3:/b``)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(Path(base, *names))


def basename(path: str | Path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def read_bytes(url: str | Path) -> bytes | None:
    """The whole file, or None when it does not exist."""
    fs, path = fsspec.core.url_to_fs(str(url))
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def write_bytes(url: str | Path, data: bytes) -> None:
    fs, path = fsspec.core.url_to_fs(str(url))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def staging_path(out: str | Path) -> str:
    """Where ``out`` is written before ``commit``: the sibling OUT.tmp locally, OUT itself on a URL."""
    if is_url(out):
        return str(out)
    out = Path(out)
    return str(out.with_name(out.name + ".tmp"))


def start(out: str | Path) -> str:
    """A fresh, empty staging folder for ``out`` (see the module docstring); returns its path."""
    stage = staging_path(out)
    fs, path = fsspec.core.url_to_fs(stage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    return stage


def commit(stage: str, out: str | Path) -> None:
    """Move a finished staging folder into place (a no-op on a URL, where it already is)."""
    if is_url(out):
        return
    if Path(out).exists():
        shutil.rmtree(out)
    os.replace(stage, out)

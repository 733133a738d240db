"""Files and folders on a local path or any fsspec URL (``memory://``, ``file://``, ``s3://``, ...).

Stage outputs appear complete or not at all. A local folder is written as the sibling ``OUT.tmp``
and renamed into place (one atomic rename). Object stores have no rename: there OUT itself is
cleared first and written in place, and each format marks completeness by writing its marker
file last (``fingerprint.json`` for shards, ``generate.json`` for generate's folder), which
readers require.

A stage replaces only what it made: an existing OUT is replaced when it is empty or holds the
stage's signature file (``model_info.json``, ``generate.json``, ``fingerprint.json``, ...), and a
staging folder only when it carries the ``.staging`` marker that ``start`` writes into it (removed
before ``commit``). Anything else is refused with one line, never deleted.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import posixpath
import shutil
import stat
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fsspec

from pipeline.core.errors import UserError

STAGING_MARKER = ".staging"  # written into every staging folder by `start`, removed by `commit`


def url_fs(url: str | Path) -> tuple[Any, str]:
    """(fsspec filesystem, path) for a path or URL; an unknown scheme or a back-end that is not
    installed (``gs://`` without gcsfs) is one line, not a traceback."""
    try:
        return fsspec.core.url_to_fs(str(url))
    except ImportError as exc:
        raise UserError(f"{url}: the back-end for this URL is not installed ({exc})") from None
    except ValueError as exc:
        raise UserError(f"{url}: not a path or URL this machine can open ({exc})") from None


# exception types of object-store client libraries that mean "no access", not a bug (by name: the
# libraries are optional back-ends)
_ACCESS_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError",
                  "NoRegionError", "DefaultCredentialsError", "RefreshError"}


def access_problem(exc: BaseException) -> str | None:
    """One line for an object store refusing access (no credentials, denied), found anywhere in the
    exception's chain; None for anything else."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if type(exc).__name__ in _ACCESS_ERRORS:
            return f"the object store refused access: {type(exc).__name__}: {exc} (set its credentials, e.g. AWS_PROFILE)"
        exc = exc.__cause__ or exc.__context__
    return None


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def local_path(path: str | Path) -> str | None:
    """The local path that a path or a ``file://`` URL names; None for any other URL."""
    if str(path).startswith("file://"):
        return str(path)[len("file://"):]
    return None if is_url(path) else str(path)


def join(base: str | Path, *names: str) -> str:
    """``base/name/...`` for a local path or a URL (``Path`` would fold ``s3://b`` into ``s3:/b``)."""
    if is_url(base):
        return "/".join([str(base).rstrip("/"), *names])
    return str(Path(base, *names))


def basename(path: str | Path) -> str:
    return str(path).rstrip("/").rsplit("/", 1)[-1]


def read_bytes(url: str | Path) -> bytes | None:
    """The whole file, or None when it does not exist. A local device or pipe (``/dev/zero`` behind
    a shard's name) is refused, not read: it would never end."""
    local = local_path(url)
    if local is not None:
        try:
            mode = os.stat(local).st_mode
        except OSError:
            return None
        if not stat.S_ISREG(mode):
            raise UserError(f"{url}: not a regular file (a device, pipe or folder); refused, not read")
    fs, path = url_fs(str(url))
    try:
        return fs.cat_file(path)
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
        return None


def atomic_write(path: str | Path, data: bytes | str | Callable[[str], None]) -> None:
    """A local file written to a fresh temporary file beside it and renamed over ``path``: readers
    see the old file or the new one, never a part. ``data`` is the content, or a function that
    writes a given path. The temporary name is new (``.NAME.XXXXXXXX.tmp``: never a file a user
    holds), an existing file keeps its permission bits, and a symlink keeps pointing where it did
    (its target is replaced)."""
    path = Path(path)
    if path.is_symlink():
        path = path.resolve()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        if callable(data):
            data(tmp)
        else:
            Path(tmp).write_bytes(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0o22)
    os.umask(mask)
    return mask


def write_bytes(url: str | Path, data: bytes) -> None:
    fs, path = url_fs(str(url))
    fs.makedirs(posixpath.dirname(path), exist_ok=True)
    fs.pipe_file(path, data)


def staging_path(out: str | Path) -> str:
    """Where ``out`` is written before ``commit``: the sibling OUT.tmp locally, OUT itself on a URL."""
    if is_url(out):
        return str(out)
    out = Path(out)
    return str(out.with_name(out.name + ".tmp"))


def _replaceable(url: str, signature: tuple[str, ...], marker: bool) -> bool:
    """Nothing there, an empty folder, or a folder this stage made (its signature file or marker)."""
    fs, path = url_fs(url)
    if not fs.exists(path):
        return True
    if not fs.isdir(path):
        return False
    names = [posixpath.basename(str(p).rstrip("/")) for p in fs.ls(path, detail=False)]
    return not names or any(s in names for s in signature) or (marker and STAGING_MARKER in names)


def refuse_foreign(out: str | Path, signature: tuple[str, ...]) -> None:
    """Refuse (before any work) an ``out`` that exists and was not made by this stage.

    On a URL the output folder is its own staging folder, so an interrupted run's marker counts too.
    """
    if not _replaceable(str(out), signature, marker=is_url(out)):
        raise UserError(f"{out} exists and is not an output of this stage (no {' or '.join(signature)}); "
                        "it is left as it is: remove it or choose another --out")
    stage = staging_path(out)
    if not is_url(out) and not _replaceable(stage, (), marker=True):
        raise UserError(f"{stage} exists and was not left by this stage (no {STAGING_MARKER} marker); "
                        "it is left as it is: remove it")


def start(out: str | Path, *, signature: tuple[str, ...]) -> str:
    """A fresh, empty staging folder for ``out`` (see the module docstring); returns its path.

    ``signature`` names the file(s) that mark a finished output of the calling stage.
    """
    refuse_foreign(out, signature)
    stage = staging_path(out)
    fs, path = url_fs(stage)
    if fs.exists(path):
        fs.rm(path, recursive=True)
    fs.makedirs(path, exist_ok=True)
    fs.pipe_file(posixpath.join(path, STAGING_MARKER), b"")
    return stage


def resume(out: str | Path, *, signature: tuple[str, ...], plan: bytes) -> tuple[str, bool]:
    """``start``, except that a staging folder left by an interrupted run of the same ``plan`` (the
    bytes its marker holds) is kept as it is: (staging path, whether it was kept). What is in it is
    the caller's to check."""
    refuse_foreign(out, signature)
    stage = staging_path(out)
    fs, path = url_fs(stage)
    marker = posixpath.join(path, STAGING_MARKER)
    if plan and fs.exists(marker) and fs.cat_file(marker) == plan:
        return stage, True
    stage = start(out, signature=signature)
    fs.pipe_file(marker, plan)
    return stage, False


def remove(url: str | Path) -> None:
    """Delete one file if it is there."""
    fs, path = url_fs(str(url))
    with contextlib.suppress(FileNotFoundError):
        fs.rm_file(path)


def commit(stage: str, out: str | Path, *, signature: tuple[str, ...]) -> None:
    """Move a finished staging folder into place (on a URL it is in place: only the marker goes)."""
    fs, path = url_fs(str(stage))
    if is_url(out):
        fs.rm_file(posixpath.join(path, STAGING_MARKER))
        return
    refuse_foreign(out, signature)
    Path(stage, STAGING_MARKER).unlink(missing_ok=True)
    if Path(out).exists():
        shutil.rmtree(out)
    os.replace(stage, out)


@contextlib.contextmanager
def writer_lock(out: str | Path) -> Iterator[None]:
    """One writer per local output: an exclusive ``flock`` on the sibling file ``OUT.lock``.

    The kernel releases a flock when its process dies, so a crashed writer never blocks the next
    run. A ``file://`` URL is the local folder it names and is locked like it. On any other URL
    (no locks on object stores) nothing is locked: one writer is the user's promise.
    """
    local = local_path(out)
    if local is None:
        yield
        return
    path = Path(local).with_name(Path(local).name + ".lock")
    made = [p for p in [path.parent, *path.parent.parents] if not p.exists()]
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        with open(path, "a") as fh:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                made = []  # the other writer's folder and lock file stay
                raise UserError(f"{out} is being written by another live process (it holds {path}); "
                                "wait for it or choose another --out") from None
            try:
                yield
            finally:
                path.unlink(missing_ok=True)  # still held: no other writer can be between the two
                fcntl.flock(fh, fcntl.LOCK_UN)
    finally:
        for folder in made:  # folders made only for the lock go again if nothing else went in
            with contextlib.suppress(OSError):
                folder.rmdir()

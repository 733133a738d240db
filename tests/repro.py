"""What a comparison between two runs may assume, in one place (tests only).

The promise (README, "Reproducibility"): two runs on the same processor model with the same number
of torch threads per process and the same batches give byte-identical outputs. The thread count is
part of the input: fp32 reductions inside oneDNN/MKL/ATen kernels are split across threads, so 1 and
2 threads round differently (measured on AMD Zen 4 for a tiny UNet's forward; on Intel AVX-512 the
difference reached generated PNGs). A test that compares runs with different threads per process
(one process with the suite's threads against 2 launched processes with 1 thread each) either pins
the reference to the launched processes' count (``torch_threads``) and compares bytes, or compares
within the documented tolerance (``assert_images_close``, ``assert_features_close``).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

# The suite's torch threads: TEST_THREADS (default 2, the cores of this project's machines). It is
# exported as OMP_NUM_THREADS so that `python -m pipeline ...` children compute with the same count
# as the in-process runs they are compared with. `TEST_THREADS=1 make test` runs it all on one.
SUITE_THREADS = int(os.environ.get("TEST_THREADS", "2"))


def set_suite_threads() -> None:
    os.environ["OMP_NUM_THREADS"] = str(SUITE_THREADS)
    torch.set_num_threads(SUITE_THREADS)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with ``n`` intra-op torch threads (what each launched process gets), then restore."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tree_bytes(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` by relative path: the byte-for-byte view of an output folder."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def assert_images_close(a: np.ndarray, b: np.ndarray, *, grey_levels: int = 1) -> None:
    """uint8 images from runs that differ only in float rounding: same shape, within ``grey_levels``."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.uint8
    diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
    assert diff.max() <= grey_levels, f"{int((diff > grey_levels).sum())} pixels differ by > {grey_levels}"


def assert_features_close(a: np.ndarray, b: np.ndarray) -> None:
    """float16 features computed in float32 and rounded once: within one float16 step of each other."""
    assert a.shape == b.shape and a.dtype == b.dtype == np.float16
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    ulp = np.spacing(np.maximum(np.abs(a), np.abs(b))).astype(np.float32)
    over = np.abs(a32 - b32) > ulp
    assert not over.any(), f"{int(over.sum())} of {a.size} values differ by more than one float16 step"

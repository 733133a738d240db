"""Shared fixtures: small slices of real Fashion-MNIST, prepared once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from repro import set_suite_threads  # tests/ is on sys.path (rootdir conftest)

from pipeline.config import PrepareConfig

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "data" / "fashion-mnist"

set_suite_threads()  # TEST_THREADS (default 2), also for the CLI processes the tests start


@pytest.fixture(scope="session")
def fmnist_dir() -> Path:
    if not (FMNIST / "train-images-idx3-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST missing in {FMNIST}: run `make setup`")
    return FMNIST


@pytest.fixture(scope="session")
def fmnist_shards(tmp_path_factory, fmnist_dir) -> Path:
    """Folder with `train` (512 samples) and `test` (256) shard sets of real Fashion-MNIST."""
    from stages import prepare

    out = tmp_path_factory.mktemp("shards") / "real"
    prepare.run(PrepareConfig(source=str(fmnist_dir), out=str(out), name="fmnist", limit=512,
                              shard_size=200))
    # the test split gets the same limit; keep the first 256 for speed
    from pipeline.shards import read_split, write_split
    from pipeline.sources import Split

    test = read_split(out / "test")
    write_split(out / "test", Split(test.images[:256], test.labels[:256], test.fingerprint["classes"]),
                test.keys[:256], shard_size=128, source=str(fmnist_dir), extra={"split": "test"},
                progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional UNet (28 px, 1 channel, 10 classes) saved in our model layout."""
    from pipeline.diffusion import make_scheduler, save_model, tiny_unet

    out = tmp_path_factory.mktemp("tiny-unet") / "model"
    torch.manual_seed(0)
    save_model(out, tiny_unet(28, 1, 10), make_scheduler(), {"trained": False})
    return out

"""Shared fixtures, built once per session: small slices of real Fashion-MNIST, a tiny UNet, a small
complete feature cache made from both (``store``) and a classifier trained on it (``checkpoint``).

A module may define its own ``model_dir``, ``store`` or ``checkpoint`` (another model, a bigger
cache, a plainly trained CNN); pytest then uses that one in the module.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from repro import set_suite_threads  # tests/ is on sys.path (rootdir conftest)

from pipeline.data.config import PrepareConfig

ROOT = Path(__file__).resolve().parents[1]
FMNIST = ROOT / "data" / "fashion-mnist"

set_suite_threads()  # TEST_THREADS (default 2), also for the CLI processes the tests start


def pytest_collection_modifyitems(items) -> None:
    """Tiers (pyproject.toml): a test that needs the DVC repository of the quick profile
    (``quick_run``: `dvc repro`, experiments) is end-to-end."""
    for item in items:
        if "quick_run" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.e2e)


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
    prepare.run(PrepareConfig(source=str(fmnist_dir), out=str(out), key_prefix="fmnist", limit=512,
                              shard_size=200))
    # the test split gets the same limit; keep the first 256 for speed
    from pipeline.core.shards import Split, read_split, write_split

    test = read_split(out / "test")
    write_split(out / "test", Split(test.images[:256], test.labels[:256], test.fingerprint["classes"]),
                test.keys[:256], shard_size=128, source=str(fmnist_dir), extra={"split": "test"},
                progress=False)
    return out


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """A tiny class-conditional UNet (28 px, 1 channel, 10 classes) saved in our model layout."""
    from pipeline.diffusion.model import make_scheduler, save_model, tiny_unet

    out = tmp_path_factory.mktemp("tiny-unet") / "model"
    torch.manual_seed(0)
    save_model(out, tiny_unet(28, 1, 10), make_scheduler(), {"trained": False})
    return out


@pytest.fixture(scope="session")
def model_dir(tiny_model_dir) -> Path:
    """The tiny UNet, under the name the stage tests use for "the diffusion model"."""
    return tiny_model_dir


@pytest.fixture(scope="session")
def store(tmp_path_factory, tiny_model_dir, fmnist_shards) -> Path:
    """A complete cache: train part 64 x 2 views in 2 zarr shards of 32 rows, test part 64 x 1."""
    from reliability_helpers import extract_cfg  # imported here: it loads the whole CLI

    from stages import extract

    out = tmp_path_factory.mktemp("small-cache") / "feats.zarr"
    extract.run(extract_cfg(tiny_model_dir, fmnist_shards, out))
    return out


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory, store) -> Path:
    """A classifier trained 1 epoch on ``store`` by the train stage (the small TRAIN_ARGS run)."""
    from reliability_helpers import train_cfg

    from stages import train

    out = tmp_path_factory.mktemp("small-ckpt") / "at"
    train.run(train_cfg(store, out))
    return out

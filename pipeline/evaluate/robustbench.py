"""RobustBench's model zoo under the project's evaluation: a zoo entry loaded by RobustBench's own
loader from a local folder, never downloaded at run time.

RobustBench (RobustBench/robustbench, ``robustbench/utils.py: load_model``) looks for a zoo entry's
checkpoint at ``MODEL_DIR/DATASET/THREAT_MODEL/NAME.pt`` and downloads it when the file is missing;
here a missing file is one error line that says where to put it, and the file is only read (by
``torch.load`` with its default ``weights_only=True`` in the torch of the RobustBench environment: no
arbitrary unpickling). Entries that RobustBench serves through timm's hub, which always downloads,
are refused.

RobustBench's package imports ``autoattack`` (fra31/auto-attack's module name) on import, for its
``benchmark()``; the project's AutoAttack is ``pyautoattack`` (the same code, another module name),
so importing RobustBench alone fails with ``ModuleNotFoundError: No module named 'autoattack'``.
``import_robustbench`` lends it pyautoattack under that name for the import; RobustBench's
``benchmark()`` is not used: the project's evaluation (clean, PGD, AutoAttack with its checks)
measures zoo models exactly as it measures trained runs.

RobustBench is not in the main environment (it needs torchvision, which needs another torch build
here): ``make setup-robustbench`` makes ``.venv-rb`` with it (docs/robustbench.md).
"""

from __future__ import annotations

import pickle
import sys
import types
from pathlib import Path
from typing import Any

import torch.nn as nn

from pipeline.core.errors import UserError

# datasets whose zoo this evaluation can measure: (classes, image size); threat models: Linf only
DATASETS = {"cifar10": (10, 32), "cifar100": (100, 32)}
THREAT_MODELS = ("Linf",)
ZOO_EPS = {"Linf": 8 / 255}  # RobustBench's leaderboard budget for CIFAR Linf


def import_robustbench() -> types.ModuleType:
    """The ``robustbench`` package, or one error line saying how to get it."""
    if "autoattack" not in sys.modules:
        try:
            import autoattack  # noqa: F401 - fra31's package, where it is installed
        except ImportError:
            import pyautoattack

            sys.modules["autoattack"] = pyautoattack  # see the module docstring
    try:
        import robustbench
        import robustbench.utils  # noqa: F401
    except ImportError as e:
        raise UserError(f"RobustBench is not installed in this environment ({e}); `make setup-robustbench` "
                        "makes .venv-rb with it: run .venv-rb/bin/python -m pipeline evaluate ...") from None
    return robustbench


def zoo_path(model_dir: str | Path, dataset: str, threat_model: str, name: str) -> Path:
    """Where RobustBench's loader looks for a zoo entry's checkpoint."""
    return Path(model_dir) / dataset / threat_model / f"{name}.pt"


def check_entry(name: str, dataset: str, threat_model: str) -> dict:
    """The zoo's record of ``name`` (its architecture builder, ...), or one error line."""
    if dataset not in DATASETS:
        raise UserError(f"--dataset {dataset!r}: the evaluation measures RobustBench's {' or '.join(DATASETS)} zoo")
    if threat_model not in THREAT_MODELS:
        raise UserError(f"--threat-model {threat_model!r}: evaluate attacks in Linf only")
    import_robustbench()
    import timm
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    zoo = model_dicts[BenchmarkDataset(dataset)][ThreatModel(threat_model)]
    if name not in zoo:
        raise UserError(f"--robustbench {name!r}: not in RobustBench's {dataset} {threat_model} zoo "
                        f"({len(zoo)} entries, e.g. {', '.join(sorted(zoo)[:3])})")
    if timm.is_model(f"{name.lower().replace('-', '_')}_{dataset}_{threat_model.lower()}"):
        raise UserError(f"--robustbench {name!r}: RobustBench serves this entry through timm's hub, which "
                        "downloads it; only entries read from a local .pt file can be evaluated offline")
    return zoo[name]


def load_zoo_model(name: str, model_dir: str, dataset: str, threat_model: str,
                   device: str) -> tuple[nn.Module, dict, Path]:
    """(the zoo model in eval mode on ``device``, a config like a run's, its checkpoint file).

    The config records what the evaluation needs (image shape, classes, Linf) and where the model
    came from; ``trained_on`` is empty: a zoo model trained on the dataset's train split, so any
    test slice may be measured.
    """
    check_entry(name, dataset, threat_model)
    path = zoo_path(model_dir, dataset, threat_model, name)
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint for RobustBench's {name!r}; put the file RobustBench "
                        f"publishes for it there (nothing is downloaded at run time)")
    from robustbench.utils import load_model

    try:
        model = load_model(name, model_dir=str(model_dir), dataset=dataset, threat_model=threat_model)
    except (RuntimeError, KeyError, ValueError, TypeError, OSError, EOFError, pickle.UnpicklingError) as e:
        # not the zoo model's weights, or a pickle that is more than weights (refused, never run)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: RobustBench could not load it as {name!r} ({first[:200]})") from None
    classes, size = DATASETS[dataset]
    cfg: dict[str, Any] = {"arch": f"robustbench:{type(model).__name__}", "in_channels": 3, "image_size": size,
                           "num_classes": classes, "threat_model": threat_model, "eps": ZOO_EPS[threat_model],
                           "finished": True, "trained_on": {},
                           "robustbench": {"name": name, "dataset": dataset, "threat_model": threat_model}}
    return model.to(device).eval(), cfg, path


"""RobustBench: the registry's RobustBench architectures load into RobustBench's own classes with
the same logits, and `evaluate --robustbench NAME` measures a zoo entry read by RobustBench's loader
from a local folder (never downloaded).

Marked ``robustbench``: they run in the .venv-rb environment (`make test-robustbench`, which `make
test` runs), where robustbench and torchvision are installed; the main environment has neither. The
zoo entries' checkpoints are stand-ins: the zoo's architecture with random weights (and random
BatchNorm statistics), saved where RobustBench's loader looks and in the format it reads.
"""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch
from reliability_helpers import assert_one_error_line

from pipeline.classifiers.zoo import build_classifier
from pipeline.cli import main
from pipeline.core.shards import Split, join, make_keys, write_split

pytestmark = pytest.mark.robustbench
ZOO_NAME = "Andriushchenko2020Understanding"  # a PreActResNet-18 entry of the cifar10 Linf zoo


def _randomise(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Random weights AND BatchNorm statistics, so that every tensor of the state dict matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, t in model.state_dict().items():
            if t.is_floating_point():
                t.copy_(torch.rand(t.shape, generator=g) + 0.5 if "running_var" in name
                        else torch.randn(t.shape, generator=g) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def rb():
    from pipeline.evaluate.robustbench import import_robustbench

    return import_robustbench()


@pytest.mark.parametrize("arch", ["robustbench-wrn-28-10", "robustbench-preact-resnet18"])
def test_a_registry_model_loads_into_robustbench_unchanged(rb, arch):
    from robustbench.model_zoo.architectures.resnet import PreActResNet18
    from robustbench.model_zoo.architectures.wide_resnet import WideResNet

    ours = _randomise(build_classifier(arch, 3, 10, 32), seed=1)
    theirs = (WideResNet(depth=28, widen_factor=10) if "wrn" in arch else PreActResNet18()).eval()
    assert set(ours.state_dict()) == set(theirs.state_dict())
    theirs.load_state_dict(ours.state_dict(), strict=True)
    x = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)
    ours.load_state_dict(_randomise(theirs, seed=3).state_dict(), strict=True)  # and back
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def zoo(tmp_path_factory, rb):
    """A model folder holding ZOO_NAME's checkpoint (random weights) and CIFAR-shaped test shards."""
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    root = tmp_path_factory.mktemp("robustbench")
    model = _randomise(model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf][ZOO_NAME]["model"](), seed=4)
    path = root / "models" / "cifar10" / "Linf" / f"{ZOO_NAME}.pt"
    path.parent.mkdir(parents=True)
    torch.save({"last": model.state_dict()}, path)  # RobustBench keeps this entry's last checkpoint
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 16).astype(np.int64),
                  [str(c) for c in range(10)])
    write_split(join(root / "shards", "test"), split, make_keys("cifar", "test", 16), shard_size=8, progress=False)
    return root, model, split


def test_evaluate_measures_a_zoo_entry_read_from_the_local_folder(zoo, tmp_path):
    root, model, split = zoo
    out = tmp_path / "zoo.json"
    main(["evaluate", "--robustbench", ZOO_NAME, "--model-dir", str(root / "models"), "--shards",
          str(root / "shards" / "test"), "--n", "8", "--pgd-steps", "2", "--pgd-restarts", "1", "--autoattack", "none",
          "--check-n", "8", "--out", str(out)])
    res = json.loads(out.read_text())
    x = torch.from_numpy(split.images[:8]).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        want = (model(x).argmax(1) == torch.from_numpy(split.labels[:8])).float().mean().item()
    assert res["clean"] == want and res["variant"] == ZOO_NAME and res["eps"] == 8 / 255
    assert res["train_config"]["robustbench"] == {"name": ZOO_NAME, "dataset": "cifar10", "threat_model": "Linf"}
    assert res["checkpoint"].endswith(f"cifar10/Linf/{ZOO_NAME}.pt") and len(res["checkpoint_sha256"]) == 64
    assert 0 <= res["pgd"] <= res["clean"]


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):  # what a hostile checkpoint would run if it were unpickled in full
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("case", ["missing", "unknown", "timm", "dataset", "threat", "garbage", "hostile"])
def test_a_zoo_entry_that_cannot_be_read_locally_is_one_error_line(zoo, tmp_path, capsys, case, rb):
    import timm
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    root, _, _ = zoo
    models, name, extra = root / "models", ZOO_NAME, []
    if case == "missing":
        models = tmp_path / "empty"
    elif case == "unknown":
        name = "NoSuchModel2099"
    elif case == "timm":
        zoo_names = model_dicts[BenchmarkDataset.cifar_10][ThreatModel.Linf]
        name = next(n for n in zoo_names if timm.is_model(f"{n.lower().replace('-', '_')}_cifar10_linf"))
    elif case == "dataset":
        extra = ["--dataset", "imagenet"]
    elif case == "threat":
        extra = ["--threat-model", "L2"]
    else:
        bad = tmp_path / "bad" / "cifar10" / "Linf" / f"{ZOO_NAME}.pt"
        bad.parent.mkdir(parents=True)
        if case == "garbage":
            bad.write_bytes(b"not a checkpoint")
        else:
            torch.save({"last": _Payload(tmp_path / "ran")}, bad)
        models = tmp_path / "bad"
    out = tmp_path / "x.json"
    with pytest.raises(SystemExit) as e:
        main(["evaluate", "--robustbench", name, "--model-dir", str(models), "--shards", str(root / "shards" / "test"),
              "--n", "4", "--out", str(out), *extra])
    line = assert_one_error_line(e.value.code, capsys.readouterr().err)
    want = {"missing": "nothing is downloaded", "unknown": "not in RobustBench's", "timm": "timm's hub",
            "dataset": "--dataset", "threat": "Linf only", "garbage": "could not load", "hostile": "could not load"}[case]
    assert want in line, line
    assert not out.exists() and not (tmp_path / "ran").exists()
    if case == "missing":
        assert str(models / "cifar10" / "Linf" / f"{ZOO_NAME}.pt") in line and not models.exists()

"""Classifier registry and checkpoints: shapes, and a save/load round trip that is bit-exact."""

from __future__ import annotations

import json

import pytest
import torch

from pipeline.classifiers.zoo import CLASSIFIERS, build_classifier, load_classifier, save_checkpoint
from pipeline.core.errors import UserError
from pipeline.train.model import ProjectionHead


@pytest.mark.parametrize("arch", ["cnn", "resnet", "wrn-16-2"])
def test_shapes(arch):
    m = build_classifier(arch, 1, 10, 28)
    x = torch.rand(3, 1, 28, 28)
    assert m(x).shape == (3, 10)
    assert m.features(x).shape == (3, m.feature_dim)
    assert ProjectionHead(m.feature_dim, 32, 7)(m.features(x)).shape == (3, 7)


def test_registry_names():
    assert {"cnn", "resnet", "preact-resnet18", "wrn-28-10"} <= set(CLASSIFIERS)
    with pytest.raises(UserError):
        build_classifier("vgg", 1, 10, 28)


def test_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    m = build_classifier("cnn", 1, 10, 28)
    m.train()(torch.rand(8, 1, 28, 28))  # move BN running stats away from their init
    cfg = {"arch": "cnn", "in_channels": 1, "num_classes": 10, "image_size": 28, "train": {"lr": 0.1}}
    save_checkpoint(tmp_path / "ck", m, cfg, head={"w": torch.ones(2)})
    m2, cfg2 = load_classifier(tmp_path / "ck")
    assert cfg2 == cfg and not m2.training
    for (k, a), (_, b) in zip(m.state_dict().items(), m2.state_dict().items()):
        assert torch.equal(a, b), k
    assert (tmp_path / "ck" / "head.safetensors").exists()
    assert not list((tmp_path / "ck").glob("*.tmp"))


def test_load_refuses_bad_folder(tmp_path):
    with pytest.raises(UserError):
        load_classifier(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"arch": "cnn"}))
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError):
        load_classifier(tmp_path)

"""The names of the classifier architectures (their builders: ``pipeline/classifiers/zoo.py``), apart
from the builders so that a stage's settings can name them without depending on the zoo, and the
stages that train no classifier do not depend on this list."""

from __future__ import annotations

from enum import Enum


class Arch(str, Enum):
    """Classifier architectures (builders: ``pipeline/classifiers/zoo.py``)."""

    cnn = "cnn"
    resnet = "resnet"
    preact_resnet18 = "preact-resnet18"
    wrn_28_10 = "wrn-28-10"
    wrn_16_2 = "wrn-16-2"  # small WideResNet for quick CIFAR trials
    # RobustBench's own definitions (parameter names, [0, 1] inputs without normalisation): a trained
    # state dict loads into robustbench.model_zoo.architectures unchanged
    rb_wrn_28_10 = "robustbench-wrn-28-10"
    rb_preact_resnet18 = "robustbench-preact-resnet18"

"""RobustBench's CIFAR architectures, module for module, so that a classifier trained here loads into
RobustBench's code unchanged (and a RobustBench checkpoint loads here) with the same outputs.

Written against RobustBench/robustbench ``robustbench/model_zoo/architectures/wide_resnet.py``
(``WideResNet(depth=28, widen_factor=10)``, from yaodongyu/TRADES) and ``.../resnet.py``
(``PreActResNet18()``: ``PreActBlock`` with the shortcut on the block's raw input and no BatchNorm
before the classifier). Parameter and buffer names match theirs; the activations are not in place
(no state, the same numbers) so that ``feature_blocks`` may hook any block. Inputs are images in
[0, 1] without normalisation, as RobustBench feeds these models. tests/test_robustbench.py loads
each into RobustBench's class and compares the logits.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


class _PreActPair(nn.Module):
    """BN-ReLU-conv twice, the modules named as both of RobustBench's blocks name them."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)

    def branch(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(the pre-activated input, the residual branch's output)."""
        o = F.relu(self.bn1(x))
        return o, self.conv2(F.relu(self.bn2(self.conv1(o))))


class _WRNBlock(_PreActPair):
    """``BasicBlock`` of RobustBench's WideResNet: a projection shortcut on the pre-activated input
    where the width changes, the raw input otherwise."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        self.convShortcut = None if cin == cout else nn.Conv2d(cin, cout, 1, stride, 0, bias=False)  # noqa: N815

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o, h = self.branch(x)
        return h + (x if self.convShortcut is None else self.convShortcut(o))


class _NetworkBlock(nn.Module):
    def __init__(self, n: int, cin: int, cout: int, stride: int):
        super().__init__()
        self.layer = nn.Sequential(*[_WRNBlock(cin if i == 0 else cout, cout, stride if i == 0 else 1) for i in range(n)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


class RBWideResNet(nn.Module):
    """RobustBench's ``WideResNet(depth, num_classes, widen_factor)`` (bias on the last layer)."""

    def __init__(self, in_channels: int, num_classes: int, depth: int = 28, widen: int = 10):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n+4, got {depth}")
        n, widths = (depth - 4) // 6, (16, 16 * widen, 32 * widen, 64 * widen)
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.block1 = _NetworkBlock(n, widths[0], widths[1], 1)
        self.block2 = _NetworkBlock(n, widths[1], widths[2], 2)
        self.block3 = _NetworkBlock(n, widths[2], widths[3], 2)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.feature_dim = widths[3]

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.bn1(self.block3(self.block2(self.block1(self.conv1(x)))))
        return F.relu(h).mean(dim=(2, 3))  # RobustBench: avg_pool2d(., 8) on the 8x8 map of a 32 px image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class _PreActBlock(_PreActPair):
    """RobustBench's ``PreActBlock`` (``out_shortcut=False``): the shortcut reads the raw input."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, stride)
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _, h = self.branch(x)
        return h + (self.shortcut(x) if hasattr(self, "shortcut") else x)


class RBPreActResNet18(nn.Module):
    """RobustBench's ``PreActResNet18()``: no BatchNorm-ReLU before the pooling, a ``linear`` head."""

    def __init__(self, in_channels: int, num_classes: int):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        cin, layers = 64, []
        for width, stride in zip((64, 128, 256, 512), (1, 2, 2, 2)):
            layers.append(nn.Sequential(_PreActBlock(cin, width, stride), _PreActBlock(width, width, 1)))
            cin = width
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.linear = nn.Linear(512, num_classes)
        self.feature_dim = 512

    @property
    def fc(self) -> nn.Linear:  # the name the rest of the project reads the classifier layer by
        return self.linear

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.layer4(self.layer3(self.layer2(self.layer1(self.conv1(x)))))
        return h.mean(dim=(2, 3))  # RobustBench: avg_pool2d(., 4) on the 4x4 map of a 32 px image

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear(self.features(x))

"""Classifier registry, the DRA projection head, and safetensors checkpoints.

Every classifier exposes ``features(x) -> (B, F)`` (the penultimate representation the DRA head
reads by default), ``forward(x) -> logits`` and ``feature_dim``; ``feature_blocks`` names the
blocks whose (B, C, H, W) maps a DRA head can read instead (``train --align-layer``). Inputs are float images in [0, 1],
(B, C, H, W); each model normalises internally so attacks work directly in pixel space.

Checkpoints are a folder of ``model.safetensors`` + ``config.json`` (plus optional extra
safetensors files for resume state): nothing is ever unpickled, and files are written to a
temporary name and renamed, so a folder never holds a half-written checkpoint file.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from pipeline.classifiers.archs import Arch
from pipeline.classifiers.rb_archs import RBPreActResNet18, RBWideResNet
from pipeline.core.errors import UserError
from pipeline.core.storage import atomic_write


class _Classifier(nn.Module):
    """Shared forward: logits = linear(features(x))."""

    feature_dim: int
    fc: nn.Linear

    def features(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(x))


class SmallCNN(_Classifier):
    """Three 3x3 convs with BatchNorm (widths w, 2w, 4w; two stride-2), global pool, MLP to F.

    Sized for CPU (~2M multiply-adds per 28 px image): PGD-5 AT on 128 Fashion-MNIST images
    costs a few tenths of a second per step on 2 cores.
    """

    def __init__(self, in_channels: int, num_classes: int, width: int = 16, feature_dim: int = 128):
        super().__init__()
        w = width

        def block(cin: int, cout: int, stride: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
                                 nn.BatchNorm2d(cout), nn.ReLU(inplace=True))

        self.body = nn.Sequential(block(in_channels, w, 1), block(w, 2 * w, 2), block(2 * w, 4 * w, 2))
        self.proj = nn.Sequential(nn.Linear(4 * w, feature_dim), nn.ReLU(inplace=True))
        self.feature_dim = feature_dim
        self.fc = nn.Linear(feature_dim, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = self.body(x * 2 - 1)
        return self.proj(h.mean(dim=(2, 3)))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.short = nn.Sequential()
        if stride != 1 or cin != cout:
            self.short = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(h)) + self.short(x))


class ResNet(_Classifier):
    """A small post-activation ResNet: stem + one BasicBlock per stage, widths (w, 2w, 4w)."""

    def __init__(self, in_channels: int, num_classes: int, width: int = 32, blocks: int = 1):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(in_channels, width, 3, 1, 1, bias=False),
                                  nn.BatchNorm2d(width), nn.ReLU(inplace=True))
        layers, cin = [], width
        for i, cout in enumerate((width, 2 * width, 4 * width)):
            for j in range(blocks):
                layers.append(_BasicBlock(cin, cout, 2 if (i > 0 and j == 0) else 1))
                cin = cout
        self.layers = nn.Sequential(*layers)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x * 2 - 1)).mean(dim=(2, 3))


class _PreActBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.short = None
        if stride != 1 or cin != cout:
            self.short = nn.Conv2d(cin, cout, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o = F.relu(self.bn1(x))
        short = self.short(o) if self.short is not None else x
        h = self.conv1(o)
        h = F.relu(self.bn2(h))
        if self.dropout:
            h = F.dropout(h, self.dropout, self.training)
        return self.conv2(h) + short


class PreActResNet(_Classifier):
    """Pre-activation ResNet (He et al. 2016) as used in the AT literature, CIFAR stem.

    Also builds WideResNets (Zagoruyko & Komodakis): depth 28, widen 10 -> WRN-28-10.
    Standard CIFAR per-channel normalisation is not applied; inputs are mapped to [-1, 1].
    """

    def __init__(self, in_channels: int, num_classes: int, stages: tuple[int, ...],
                 widths: tuple[int, ...], stem: int, strides: tuple[int, ...], dropout: float = 0.0):
        super().__init__()
        self.stem = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        layers, cin = [], stem
        for n, w, s in zip(stages, widths, strides):
            for j in range(n):
                layers.append(_PreActBlock(cin, w, s if j == 0 else 1, dropout))
                cin = w
        self.layers = nn.Sequential(*layers)
        self.bn = nn.BatchNorm2d(cin)
        self.feature_dim = cin
        self.fc = nn.Linear(cin, num_classes)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.layers(self.stem(x * 2 - 1))))
        return h.mean(dim=(2, 3))


def _preact18(c: int, k: int) -> nn.Module:
    return PreActResNet(c, k, (2, 2, 2, 2), (64, 128, 256, 512), 64, (1, 2, 2, 2))


def _wrn(depth: int, widen: int) -> Callable[[int, int], nn.Module]:
    n = (depth - 4) // 6
    return lambda c, k: PreActResNet(c, k, (n, n, n), (16 * widen, 32 * widen, 64 * widen), 16, (1, 2, 2))


# name -> builder(in_channels, num_classes); the CLI's --arch choices.
CLASSIFIERS: dict[Arch, Callable[[int, int], nn.Module]] = {
    Arch.cnn: lambda c, k: SmallCNN(c, k),
    Arch.resnet: lambda c, k: ResNet(c, k, width=16),
    Arch.preact_resnet18: _preact18,
    Arch.wrn_28_10: _wrn(28, 10),
    Arch.wrn_16_2: _wrn(16, 2),
    Arch.rb_wrn_28_10: lambda c, k: RBWideResNet(c, k, 28, 10),
    Arch.rb_preact_resnet18: RBPreActResNet18,
}


def build_classifier(arch: str, in_channels: int, num_classes: int, image_size: int) -> nn.Module:
    """Registry lookup. All archs pool globally, so any image size >= 8 works."""
    try:
        arch = Arch(arch)
    except ValueError:
        raise UserError(f"unknown arch {arch!r}; choose one of {', '.join(a.value for a in Arch)}") from None
    if not (8 <= image_size <= 4096 and 1 <= in_channels <= 64 and 2 <= num_classes <= 100_000):
        raise UserError(f"bad classifier shape: image_size={image_size}, in_channels={in_channels}, "
                        f"num_classes={num_classes}")
    model = CLASSIFIERS[arch](in_channels, num_classes)
    model.arch = arch.value  # type: ignore[assignment]
    return model


def feature_blocks(model: nn.Module, in_channels: int, image_size: int) -> dict[str, tuple[int, int, int]]:
    """The blocks ``--align-layer`` may name, in forward order -> the (C, H, W) of their output map.

    Candidates are the top-level modules and the numbered blocks of top-level containers of blocks
    (SmallCNN: ``body.0``..``body.2``; ResNet: ``stem``, ``layers.0``..; PreActResNet: ``stem``,
    ``layers.N``, ``bn``); those whose output is a 4-D map, found with one blank forward in eval
    mode (no statistics change, no random numbers drawn). Their outputs are not modified in place
    later in the forward, so a hook may keep them for the loss.
    """
    names = []
    for name, child in model.named_children():
        if name == "fc":
            continue
        # a container of blocks is listed block by block; one of plain layers (a conv-BN-ReLU stem,
        # whose in-place ReLU rewrites its BN's output) only as a whole
        if isinstance(child, (nn.Sequential, nn.ModuleList)) and all(any(True for _ in c.children()) for c in child):
            names += [f"{name}.{i}" for i in range(len(child))]
        else:
            names.append(name)
    modules, shapes, handles = dict(model.named_modules()), {}, []
    for name in names:
        def hook(_m: nn.Module, _i: object, out: object, name: str = name) -> None:
            if isinstance(out, torch.Tensor) and out.ndim == 4:
                shapes[name] = tuple(int(s) for s in out.shape[1:])
        handles.append(modules[name].register_forward_hook(hook))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            p = next(model.parameters())
            model(torch.zeros((1, in_channels, image_size, image_size), device=p.device, dtype=p.dtype))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {name: shapes[name] for name in names if name in shapes}


# --- checkpoints -------------------------------------------------------------------------------
MODEL_FILE = "model.safetensors"
CONFIG_FILE = "config.json"


def save_tensors(path: str | Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (contiguous CPU copies; shared storage is split)."""
    data = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    atomic_write(path, lambda p: save_file(data, p, metadata=metadata))


def save_json(path: str | Path, obj: dict) -> None:
    atomic_write(path, json.dumps(obj, indent=2, sort_keys=True))


def save_checkpoint(folder: str | Path, model: nn.Module, config: dict,
                    **extra: dict[str, torch.Tensor]) -> None:
    """Write model.safetensors + config.json (+ NAME.safetensors per extra dict), atomically.

    ``config`` must hold arch, in_channels, num_classes, image_size (what ``load_classifier``
    needs) and anything else JSON-serialisable (the train config). config.json is written last.
    """
    missing = {"arch", "in_channels", "num_classes", "image_size"} - set(config)
    if missing:
        raise ValueError(f"checkpoint config lacks {sorted(missing)}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, tensors in extra.items():
        save_tensors(folder / f"{name}.safetensors", tensors)
    save_tensors(folder / MODEL_FILE, model.state_dict())
    save_json(folder / CONFIG_FILE, config)


def load_classifier(folder: str | Path, device: str = "cpu") -> tuple[nn.Module, dict]:
    """Rebuild the classifier from config.json and load model.safetensors; eval mode."""
    folder = Path(folder)
    cfg_path, w_path = folder / CONFIG_FILE, folder / MODEL_FILE
    if not cfg_path.is_file() or not w_path.is_file():
        raise UserError(f"{folder} is not a checkpoint folder (needs {CONFIG_FILE} and {MODEL_FILE})")
    try:
        config = json.loads(cfg_path.read_text())
        if not isinstance(config, dict):
            raise ValueError(f"{CONFIG_FILE} holds {type(config).__name__}, not a JSON object")
        model = build_classifier(config["arch"], int(config["in_channels"]), int(config["num_classes"]),
                                 int(config["image_size"]))
        state = load_file(str(w_path), device=device)
        model.load_state_dict(state)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, ValueError, TypeError, RuntimeError, OSError,
            SafetensorError) as exc:
        raise UserError(f"cannot load checkpoint {folder}: {str(exc).splitlines()[0]}") from None
    return model.to(device).eval(), config

"""Diffusion features of (already augmented) images: the target that DRA aligns to.

One embedding = noise the image to timestep ``t`` through the scheduler with a recorded seed,
run the UNet, take the output of one named block, pool it. Nothing after that block affects the
result, so the forward stops right there (a private exception raised by the hook): at the
default ``mid_block`` this costs about a fifth of a full forward.

The recipe, for one row with noise seed ``s`` (the README repeats it with diffusers alone)::

    x0    = images01 * 2 - 1                                   # (C, H, W) in [-1, 1]
    noise = torch.randn((draws, C, H, W), generator=torch.Generator().manual_seed(s))  # on CPU
    x_t   = scheduler.add_noise(x0.expand(draws, ...), noise, torch.full((draws,), t))
    h     = output of block `layer` in unet(x_t, t, class_labels)  (first element if a tuple)
    row   = mean over draws of pool(h)        # mean: over H, W -> (C,);  flatten: (C*H*W,)
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from pipeline.cache.config import Condition
from pipeline.cache.targets import Pooling, TargetSpec, reduce
from pipeline.core.errors import UserError

if TYPE_CHECKING:  # only for type hints: the loader lives in pipeline.diffusion.model
    from pipeline.diffusion.model import DiffusionModel


class _StopForward(Exception):
    """Raised by the hook to end the UNet forward right after the hooked block."""


def block_names(unet: torch.nn.Module) -> list[str]:
    """Names a user would pick as the hooked layer: top-level modules and their numbered blocks."""
    names = []
    for name, child in unet.named_children():
        if isinstance(child, torch.nn.ModuleList):
            names += [f"{name}.{i}" for i in range(len(child))]
        else:
            names.append(name)
    return names


def check_settings(model: DiffusionModel, *, t: int, layer: str, pooling: str, draws: int,
                   condition: str) -> tuple[Pooling, Condition]:
    """Refuse bad settings before any work; returns the parsed enums.

    ``condition=null`` on an unconditional model means the same thing as ``none`` (no label
    information) and is recorded as ``none``.
    """
    steps = int(model.scheduler.config.num_train_timesteps)
    if not 0 <= int(t) < steps:
        raise UserError(f"timestep t={t} is outside the schedule [0, {steps - 1}] of this model")
    modules = dict(model.unet.named_modules())
    if not layer or layer not in modules:
        raise UserError(f"unknown layer {layer!r}; blocks of this UNet: {', '.join(block_names(model.unet))}")
    try:
        pool = Pooling(pooling)
    except ValueError:
        raise UserError(f"unknown pooling {pooling!r}; choose one of {[p.value for p in Pooling]}") from None
    try:
        cond = Condition(condition)
    except ValueError:
        raise UserError(f"unknown condition {condition!r}; choose one of {[c.value for c in Condition]}") from None
    if draws < 1:
        raise UserError(f"draws must be >= 1, got {draws}")
    if model.num_classes is None:
        if cond is Condition.label:
            raise UserError("condition=label needs a class-conditional model; this one is unconditional")
        cond = Condition.none
    elif cond is Condition.none:
        raise UserError("condition=none on a class-conditional model: use null (the null class) or label")
    return pool, cond


class FeatureExtractor:
    """Callable: (images01 (B,C,H,W) augmented, seeds (B,) int64, labels (B,)) -> float32 (B, D)."""

    def __init__(self, model: DiffusionModel, *, t: int, layer: str, pooling: str = "mean",
                 draws: int = 1, condition: str = "null", stop_early: bool = True) -> None:
        self.pooling, self.condition = check_settings(model, t=t, layer=layer, pooling=pooling,
                                                      draws=draws, condition=condition)
        self.model, self.t, self.layer, self.draws = model, int(t), layer, int(draws)
        self.stop_early = stop_early  # False: the UNet runs to its end (same targets, the full cost)
        self.unet, self.scheduler = model.unet, model.scheduler
        self._block = dict(self.unet.named_modules())[layer]
        self._captured: torch.Tensor | None = None
        self._gen = torch.Generator()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def settings(self) -> dict[str, Any]:
        """What a cache records about the extraction (the condition as actually used)."""
        return {"t": self.t, "layer": self.layer, "pooling": self.pooling.value, "draws": self.draws,
                "condition": self.condition.value}

    def noise(self, seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, draws, *shape) standard normal noise, one CPU generator per seed (device-independent)."""
        out = torch.empty((len(seeds), self.draws, *shape))
        for i, s in enumerate(seeds.tolist()):
            self._gen.manual_seed(int(s))
            torch.randn((self.draws, *shape), generator=self._gen, out=out[i])
        return out

    def _hook(self, _module: torch.nn.Module, _inputs: Any, output: Any) -> None:
        self._captured = output[0] if isinstance(output, tuple) else output
        if self.stop_early:
            raise _StopForward

    def _class_labels(self, labels: torch.Tensor | None, b: int) -> torch.Tensor | None:
        if self.condition is Condition.none:
            return None
        if self.condition is Condition.null:
            return torch.full((b,), int(self.model.null_class), dtype=torch.long, device=self.device)
        if labels is None:
            raise ValueError("condition=label needs labels")
        return labels.to(self.device, torch.long)

    @torch.no_grad()
    def __call__(self, images01: torch.Tensor, seeds: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = images01.shape
        dev = self.device
        x0 = (images01.to(dev, torch.float32) * 2 - 1).repeat_interleave(self.draws, dim=0)
        noise = self.noise(seeds, (c, h, w)).reshape(b * self.draws, c, h, w).to(dev)
        ts = torch.full((b * self.draws,), self.t, dtype=torch.long, device=dev)
        x_t = self.scheduler.add_noise(x0, noise, ts)
        cls = self._class_labels(labels, b)
        if cls is not None:
            cls = cls.repeat_interleave(self.draws)
        handle = self._block.register_forward_hook(self._hook)
        self._captured = None
        try:
            # important: float32 whatever autocast surrounds the call (train --online on a GPU runs
            # under bf16 autocast), so online targets equal the cached ones
            with torch.autocast(device_type=dev.type, enabled=False):
                self.unet(x_t, ts, class_labels=cls)
        except _StopForward:
            pass
        finally:
            handle.remove()
        if self._captured is None:
            raise RuntimeError(f"layer {self.layer!r} did not run in the UNet forward")
        feats = reduce(self.pooling, self._captured)
        self._captured = None
        return feats.reshape(b, self.draws, *feats.shape[1:]).mean(dim=1)

    def target_spec(self, image_size: int, in_channels: int) -> TargetSpec:
        """What each row will hold (its shape found by running one blank image)."""
        x = torch.zeros((1, in_channels, image_size, image_size))
        out = self(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        return TargetSpec(self.t, self.layer, self.pooling, tuple(out.shape[1:]))

    @classmethod
    def from_cache(cls, cache: Any, device: str | torch.device = "cpu") -> FeatureExtractor:
        """Rebuild the extractor a cache was made with (train --online); refuses other weights."""
        from pipeline.diffusion.model import load_model  # lazy: only the online mode needs the model

        a = cache.attrs
        model = load_model(a["model"]["source"], device=device)
        if model.weights_sha256 != a["model"]["weights_sha256"]:
            raise UserError(f"model {a['model']['source']}: weights differ from those the cache was built with")
        cond = a["condition"]
        if cond == "none" and model.num_classes is not None:
            raise UserError("the cache was built unconditionally but the model is class-conditional")
        return cls(model, t=a["t"], layer=a["layer"], pooling=a["pooling"], draws=a["draws"],
                   condition=cond if model.num_classes is not None else "null")

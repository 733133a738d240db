"""Diffusion features of (already augmented) images: the targets that DRA aligns to.

One embedding = noise the image to timestep ``t`` through the scheduler with a recorded seed,
run the UNet, take the output of one named block, pool it. Several blocks cost one forward: every
requested block is hooked, and the forward stops right after the last of them has run (a
private exception raised by the hook; nothing later affects a target). Several timesteps cost one
forward each, all from the **same noise draw** (the noise of a (sample, view) is shared across
timesteps, so the sets differ only in t and layer).

The recipe, for one row with noise seed ``s`` (the README repeats it with diffusers alone)::

    x0    = images01 * 2 - 1                                   # (C, H, W) in [-1, 1]
    noise = torch.randn((draws, C, H, W), generator=torch.Generator().manual_seed(s))  # on CPU
    x_t   = scheduler.add_noise(x0.expand(draws, ...), noise, torch.full((draws,), t))  # same noise for every t
    h     = output of block `layer` in unet(x_t, t, class_labels)  (first element if a tuple)
    row   = mean over draws of pool(h)        # mean: over H, W -> (C,);  flatten: (C*H*W,)
                                              # grid4 / grid7: F.adaptive_avg_pool2d(h, G) -> (C, G, G)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import torch

from pipeline.cache.contract import Condition
from pipeline.cache.targets import Pooling, TargetSpec, reduce
from pipeline.core.errors import UserError

if TYPE_CHECKING:  # only for type hints: the loader lives in pipeline.diffusion.model, the reader in the store
    from pipeline.cache.store import FeatureCache
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


def _as_list(value: Any) -> list:
    return list(value) if isinstance(value, (list, tuple)) else [value]


def check_settings(model: DiffusionModel, *, t: int | Sequence[int], layer: str | Sequence[str], pooling: str,
                   draws: int, condition: str) -> tuple[Pooling, Condition]:
    """Refuse bad settings before any work; returns the parsed enums.

    ``condition=null`` on an unconditional model means the same thing as ``none`` (no label
    information) and is recorded as ``none``.
    """
    steps = int(model.scheduler.config.num_train_timesteps)
    ts, layers = _as_list(t), _as_list(layer)
    if not ts or not layers:
        raise UserError("at least one timestep and one layer are needed")
    for name, values in (("timestep", ts), ("layer", layers)):
        if len(set(values)) != len(values):
            raise UserError(f"a {name} is given twice: {values}")
    for one in ts:
        if not 0 <= int(one) < steps:
            raise UserError(f"timestep t={one} is outside the schedule [0, {steps - 1}] of this model")
    modules = dict(model.unet.named_modules())
    for one in layers:
        if not one or one not in modules:
            raise UserError(f"unknown layer {one!r}; blocks of this UNet: {', '.join(block_names(model.unet))}")
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
    """Callable on (images01 (B,C,H,W) augmented, seeds (B,) int64, labels (B,)).

    ``embed`` returns every requested (t, layer) target as float32 (B, *shape); calling the
    extractor returns the one target of a single-set extractor (``train --online``).
    """

    def __init__(self, model: DiffusionModel, *, t: int | Sequence[int], layer: str | Sequence[str],
                 pooling: str = "mean", draws: int = 1, condition: str = "null", stop_early: bool = True) -> None:
        self.pooling, self.condition = check_settings(model, t=t, layer=layer, pooling=pooling,
                                                      draws=draws, condition=condition)
        self.model, self.draws = model, int(draws)
        self.timesteps = [int(x) for x in _as_list(t)]
        self.layers = [str(x) for x in _as_list(layer)]
        self.stop_early = stop_early  # False: the UNet runs to its end (same targets, the full cost)
        self.unet, self.scheduler = model.unet, model.scheduler
        modules = dict(self.unet.named_modules())
        self._blocks = {name: modules[name] for name in self.layers}
        self._captured: dict[str, torch.Tensor] = {}
        self._gen = torch.Generator()

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @property
    def sets(self) -> list[tuple[int, str]]:
        """Every (t, layer), t-major: the order of the store's target sets (the first is the default)."""
        return [(t, layer) for t in self.timesteps for layer in self.layers]

    def options(self) -> dict[str, Any]:
        """The constructor's arguments that give this extractor again (another ``stop_early``, say)."""
        return {"t": self.timesteps, "layer": self.layers, "pooling": self.pooling.value, "draws": self.draws,
                "condition": self.condition.value}

    def noise(self, seeds: torch.Tensor, shape: tuple[int, ...]) -> torch.Tensor:
        """(B, draws, *shape) standard normal noise, one CPU generator per seed (device-independent)."""
        out = torch.empty((len(seeds), self.draws, *shape))
        for i, s in enumerate(seeds.tolist()):
            self._gen.manual_seed(int(s))
            torch.randn((self.draws, *shape), generator=self._gen, out=out[i])
        return out

    def _hook(self, name: str) -> Any:
        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            self._captured[name] = output[0] if isinstance(output, tuple) else output
            if self.stop_early and len(self._captured) == len(self._blocks):
                raise _StopForward  # the last requested block has run
        return hook

    def _class_labels(self, labels: torch.Tensor | None, b: int) -> torch.Tensor | None:
        if self.condition is Condition.none:
            return None
        if self.condition is Condition.null:
            return torch.full((b,), int(self.model.null_class), dtype=torch.long, device=self.device)
        if labels is None:
            raise ValueError("condition=label needs labels")
        return labels.to(self.device, torch.long)

    @torch.no_grad()
    def embed(self, images01: torch.Tensor, seeds: torch.Tensor,
              labels: torch.Tensor | None = None) -> dict[tuple[int, str], torch.Tensor]:
        """(t, layer) -> float32 (B, *shape): one forward per timestep, one noise draw for all of them."""
        b, c, h, w = images01.shape
        dev = self.device
        x0 = (images01.to(dev, torch.float32) * 2 - 1).repeat_interleave(self.draws, dim=0)
        noise = self.noise(seeds, (c, h, w)).reshape(b * self.draws, c, h, w).to(dev)
        cls = self._class_labels(labels, b)
        if cls is not None:
            cls = cls.repeat_interleave(self.draws)
        out = {}
        for t in self.timesteps:
            ts = torch.full((b * self.draws,), t, dtype=torch.long, device=dev)
            x_t = self.scheduler.add_noise(x0, noise, ts)
            handles = [blk.register_forward_hook(self._hook(name)) for name, blk in self._blocks.items()]
            self._captured = {}
            try:
                # important: float32 whatever autocast surrounds the call (train --online on a GPU runs
                # under bf16 autocast), so online targets equal the cached ones
                with torch.autocast(device_type=dev.type, enabled=False):
                    self.unet(x_t, ts, class_labels=cls)
            except _StopForward:
                pass
            finally:
                for handle in handles:
                    handle.remove()
            for layer in self.layers:
                if layer not in self._captured:
                    raise RuntimeError(f"layer {layer!r} did not run in the UNet forward")
                try:
                    feats = reduce(self.pooling, self._captured[layer])
                except ValueError as exc:  # a grid of a block that outputs vectors
                    raise UserError(f"layer {layer!r}: {exc}") from None
                out[(t, layer)] = feats.reshape(b, self.draws, *feats.shape[1:]).mean(dim=1)
            self._captured = {}
        return out

    def __call__(self, images01: torch.Tensor, seeds: torch.Tensor,
                 labels: torch.Tensor | None = None) -> torch.Tensor:
        if len(self.sets) != 1:
            raise ValueError(f"this extractor computes {len(self.sets)} target sets: use embed()")
        return self.embed(images01, seeds, labels)[self.sets[0]]

    def target_specs(self, image_size: int, in_channels: int) -> list[TargetSpec]:
        """What each set's rows will hold (shapes found by running one blank image), in ``sets`` order."""
        x = torch.zeros((1, in_channels, image_size, image_size))
        out = self.embed(x, torch.zeros(1, dtype=torch.long), torch.zeros(1, dtype=torch.long))
        return [TargetSpec(t, layer, self.pooling, tuple(out[(t, layer)].shape[1:])) for t, layer in self.sets]

    @classmethod
    def from_cache(cls, cache: FeatureCache, target: TargetSpec, device: str | torch.device = "cpu") -> FeatureExtractor:
        """Rebuild the extractor of one of a cache's target sets (train --online); refuses other weights."""
        from pipeline.diffusion.model import load_model  # lazy: only the online mode needs the model

        plan, source = cache.plan, cache.model_source  # a folder relative to the store, or a hub id
        model = load_model(source, device=device)
        if model.weights_sha256 != plan.model.weights_sha256:
            raise UserError(f"model {source}: weights differ from those the cache was built with")
        cond = plan.condition
        if cond == "none" and model.num_classes is not None:
            raise UserError("the cache was built unconditionally but the model is class-conditional")
        ext = cls(model, t=target.t, layer=target.layer, pooling=target.pooling, draws=plan.draws,
                  condition=cond if model.num_classes is not None else "null")
        made = ext.target_specs(model.image_size, model.in_channels)[0]
        if made != target:
            raise UserError(f"model {source}: gives {made.name} targets of shape {made.shape}, "
                            f"the cache holds {target.shape}")
        return ext

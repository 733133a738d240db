"""`pipeline bench --profile gpu`: the figures a user with one CUDA GPU wants before a real run
(a few minutes), through the same code paths and timer as the CPU benchmark.

On a CIFAR-sized diffusion UNet (google/ddpm-cifar10-32's architecture with random weights: timing
needs no trained ones) and the registry's CIFAR classifiers:

- extract throughput (views/s) of the project's ``FeatureExtractor`` stopped at ``mid_block`` (fp32,
  what `extract` computes), and of a bare forward to the same block under bf16 autocast (what a bf16
  extraction would cost; the cache is computed in fp32);
- seconds per adversarial step (PGD-10, batch 512) of plain AT, AT+DRA with cached targets and AT+DRA
  with online targets, for PreAct-ResNet-18 and WRN-28-10, through ``adversarial_step`` (the train
  stage's step) under bf16 autocast as `train` uses on GPUs, interleaved step by step; cached / plain
  and online / cached; the peak GPU memory of each;
- online targets computed on the GPU inside bf16 autocast against the same targets computed on the
  CPU in fp32 (cosine; the extractor disables autocast, so they must agree to fp32 rounding).

``--dry-run`` runs the same code at tiny sizes on the CPU (what the tests check).
"""

from __future__ import annotations

import copy
from typing import Any

import torch

from pipeline.bench import benchmark as B
from pipeline.bench.config import BenchConfig
from pipeline.bench.figures import GPU_ARCHS
from pipeline.cache.extractor import FeatureExtractor
from pipeline.classifiers.zoo import build_classifier
from pipeline.diffusion.model import DiffusionModel, make_scheduler
from pipeline.train.config import Method
from pipeline.train.model import DRANet, ProjectionHead
from pipeline.train.step import StepSettings, adversarial_step

# google/ddpm-cifar10-32's UNet2DModel config (its public model card / config.json)
CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
TINY_UNET = {**CIFAR_UNET, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1}
T, LAYER = 100, "mid_block"


def _peak_mb(fn: Any, device: torch.device) -> float | None:
    """Peak GPU memory (MiB) of one call of ``fn`` (None on the CPU)."""
    if device.type != "cuda":
        fn()
        return None
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def extract_figures(model: DiffusionModel, n: int, batch: int, device: torch.device, repeats: int) -> dict:
    ext = FeatureExtractor(model, t=T, layer=LAYER, condition="none")
    x, seeds = torch.rand(n, 3, 32, 32, device=device), torch.arange(n)

    def fp32() -> None:
        for i in range(0, n, batch):
            ext(x[i:i + batch], seeds[i:i + batch])

    def bf16() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            B.bare_forward(model.unet, model.scheduler, x, t=T, layer=LAYER, batch_size=batch, class_label=None)

    times = B.interleaved({"fp32": fp32, "bf16": bf16}, rounds=repeats, device=device)
    return {"extract_views_per_s_fp32": round(n / B.median(times["fp32"]), 1),
            "bare_forward_views_per_s_bf16": round(n / B.median(times["bf16"]), 1),
            "extract_peak_mb": _peak_mb(fp32, device)}


def step_figures(arch: str, model: DiffusionModel, batch: int, device: torch.device, repeats: int) -> dict:
    clf = build_classifier(arch, 3, 10, 32)
    ext = FeatureExtractor(model, t=T, layer=LAYER, condition="none")
    d = ext.target_specs(32, 3)[0].size
    net = DRANet(clf, ProjectionHead(clf.feature_dim, 512, d)).to(device).train()
    plain_net = DRANet(clf, None)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    s = StepSettings(Method.pgd, eps=8 / 255, alpha=2 / 255, steps=10, beta=6.0, label_smoothing=0.0)
    x, y = torch.rand(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    cached, seeds = torch.randn(batch, d, device=device), torch.arange(batch)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(target_fn: Any, which: DRANet) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            target = target_fn()
            loss, _, _ = adversarial_step(which, clf, x, y, target, 0.5 if target is not None else 0.0, s, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    fns = {"plain": lambda: step(lambda: None, plain_net), "cached": lambda: step(lambda: cached, net),
           "online": lambda: step(lambda: ext(x, seeds), net)}
    times = B.interleaved(fns, rounds=repeats, device=device)
    out: dict[str, Any] = {}
    for name, fn in fns.items():
        out[f"{arch}_{name}_s_per_step"] = round(B.median(times[name]), 4)
        out[f"{arch}_{name}_peak_mb"] = _peak_mb(fn, device)
    out[f"{arch}_cached_over_plain"] = round(out[f"{arch}_cached_s_per_step"] / out[f"{arch}_plain_s_per_step"], 3)
    out[f"{arch}_online_over_cached"] = round(out[f"{arch}_online_s_per_step"] / out[f"{arch}_cached_s_per_step"], 3)
    return out


def equality_figure(model: DiffusionModel, device: torch.device, n: int) -> dict:
    """Targets on the device inside bf16 autocast vs on the CPU in fp32, same images and seeds."""
    x, seeds = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(n)
    cpu_model = copy.deepcopy(model)
    cpu_model.unet.to("cpu")
    ref = FeatureExtractor(cpu_model, t=T, layer=LAYER, condition="none")(x, seeds)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = FeatureExtractor(model, t=T, layer=LAYER, condition="none")(x.to(device), seeds).cpu()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    return {"online_vs_cpu_fp32_min_cosine": round(float(cos.min()), 6),
            "online_vs_cpu_fp32_max_abs_diff": float((got - ref).abs().max()), "online_dtype": str(got.dtype)}


def run_gpu(cfg: BenchConfig, device: torch.device) -> dict:
    """Every GPU figure (tiny sizes on the CPU with ``cfg.dry_run``)."""
    from diffusers import UNet2DModel

    n, batch, repeats = (32, 8, 1) if cfg.dry_run else (8192, 512, 5)
    torch.manual_seed(cfg.seed)
    unet = UNet2DModel(**(TINY_UNET if cfg.dry_run else CIFAR_UNET)).to(device).eval().requires_grad_(False)
    model = DiffusionModel(unet, make_scheduler(1000, "linear"), None, None, 32, 3, "random", "random")
    res: dict[str, Any] = {"unet_params_m": round(sum(q.numel() for q in unet.parameters()) / 1e6, 2)}
    res |= extract_figures(model, n, 16 if cfg.dry_run else batch, device, repeats)
    for arch in (("cnn",) if cfg.dry_run else GPU_ARCHS):
        res |= step_figures(arch, model, batch, device, repeats)
    return res | equality_figure(model, device, 8 if cfg.dry_run else 64)


def gpu_table(res: dict) -> str:
    """The GPU figures as the lines `pipeline bench --profile gpu` prints."""
    figures = {k: v for k, v in res.items() if k not in ("machine", "config", "targets")}
    width = max(map(len, figures))
    return "\n".join(f"{k:{width}s}  {v}" for k, v in figures.items())

"""GPU check: the figures a user with one CUDA GPU wants before a real run, in one command (< 8 min).

    bash scripts/gpu_check.sh            # on a machine with a CUDA GPU
    bash scripts/gpu_check.sh --dry-run  # anywhere: the same code paths at tiny size on the CPU

Prints, for a CIFAR-sized diffusion UNet (the architecture of google/ddpm-cifar10-32 with random
weights: timing needs no trained ones) and the CIFAR classifiers of the registry:

- extract throughput (views/s) of the project's FeatureExtractor stopped at ``mid_block`` (fp32,
  what `extract` computes), and of a bare forward to the same block under bf16 autocast (what a
  bf16 extraction would cost; the cache is computed in fp32);
- seconds per adversarial step (PGD-10, batch 512) of plain AT, AT+DRA with cached targets and
  AT+DRA with online targets, for PreAct-ResNet-18 and WRN-28-10, through ``adversarial_step``
  (the train stage's step) under bf16 autocast as `train` uses on GPUs; cached / plain and
  online / cached;
- peak GPU memory of each;
- online targets computed on the GPU inside bf16 autocast against the same targets computed on
  the CPU in fp32 (cosine; the extractor disables autocast, so they must agree to fp32 rounding).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from pipeline.cache.extractor import FeatureExtractor  # noqa: E402
from pipeline.core.classifiers import build_classifier  # noqa: E402
from pipeline.diffusion.model import DiffusionModel, make_scheduler  # noqa: E402
from pipeline.train.config import Method  # noqa: E402
from pipeline.train.step import (  # noqa: E402
    DRANet,
    ProjectionHead,  # noqa: E402
    StepSettings,
    adversarial_step,
)

# google/ddpm-cifar10-32's UNet2DModel config (public model card / config.json)
CIFAR_UNET = dict(sample_size=32, in_channels=3, out_channels=3, layers_per_block=2,
                  block_out_channels=(128, 256, 256, 256),
                  down_block_types=("DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "UpBlock2D", "AttnUpBlock2D", "UpBlock2D"))
TINY_UNET = {**CIFAR_UNET, "block_out_channels": (32, 32, 32, 32), "layers_per_block": 1}


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn`` after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_mb(device: torch.device) -> float | None:
    return round(torch.cuda.max_memory_allocated() / 2**20, 1) if device.type == "cuda" else None


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()


def extract_figures(model: DiffusionModel, n: int, batch: int, device: torch.device, repeats: int) -> dict:
    from pipeline.bench.benchmark import bare_forward

    ext = FeatureExtractor(model, t=100, layer="mid_block", condition="none")
    x = torch.rand(n, 3, 32, 32, device=device)
    seeds = torch.arange(n)

    def fp32() -> None:
        for i in range(0, n, batch):
            ext(x[i:i + batch], seeds[i:i + batch])

    def bf16() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bare_forward(model.unet, model.scheduler, x, t=100, layer="mid_block", batch_size=batch, class_label=None)

    reset_peak(device)
    t32 = timed(fp32, device, repeats)
    mem = peak_mb(device)
    t16 = timed(bf16, device, repeats)
    return {"extract_views_per_s_fp32": round(n / t32, 1), "bare_forward_views_per_s_bf16": round(n / t16, 1),
            "extract_peak_mb": mem}


def step_figures(arch: str, model: DiffusionModel, batch: int, device: torch.device, repeats: int) -> dict:
    clf = build_classifier(arch, 3, 10, 32)
    ext = FeatureExtractor(model, t=100, layer="mid_block", condition="none")
    d = ext.target_specs(32, 3)[0].size
    net = DRANet(clf, ProjectionHead(clf.feature_dim, 512, d)).to(device).train()
    plain_net = DRANet(clf, None)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    s = StepSettings(Method.pgd, eps=8 / 255, alpha=2 / 255, steps=10, beta=6.0, label_smoothing=0.0)
    x, y = torch.rand(batch, 3, 32, 32, device=device), torch.randint(0, 10, (batch,), device=device)
    cached = torch.randn(batch, d, device=device)
    seeds = torch.arange(batch)
    gen = torch.Generator(device=device).manual_seed(0)

    def step(target_fn, which) -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            target = target_fn()
            loss, _, _ = adversarial_step(which, clf, x, y, target, 0.5 if target is not None else 0.0, s, gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    out = {}
    for name, fn in {"plain": lambda: step(lambda: None, plain_net), "cached": lambda: step(lambda: cached, net),
                     "online": lambda: step(lambda: ext(x, seeds), net)}.items():
        reset_peak(device)
        out[f"{arch}_{name}_s_per_step"] = round(timed(fn, device, repeats), 4)
        out[f"{arch}_{name}_peak_mb"] = peak_mb(device)
    out[f"{arch}_cached_over_plain"] = round(out[f"{arch}_cached_s_per_step"] / out[f"{arch}_plain_s_per_step"], 3)
    out[f"{arch}_online_over_cached"] = round(out[f"{arch}_online_s_per_step"] / out[f"{arch}_cached_s_per_step"], 3)
    return out


def equality_figure(model: DiffusionModel, device: torch.device, n: int) -> dict:
    """Targets on the device inside bf16 autocast vs on the CPU in fp32, same images and seeds."""
    import copy

    x, seeds = torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(1)), torch.arange(n)
    cpu_model = copy.deepcopy(model)
    cpu_model.unet.to("cpu")
    ref = FeatureExtractor(cpu_model, t=100, layer="mid_block", condition="none")(x, seeds)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        got = FeatureExtractor(model, t=100, layer="mid_block", condition="none")(x.to(device), seeds).cpu()
    cos = torch.nn.functional.cosine_similarity(got, ref, dim=1)
    return {"online_vs_cpu_fp32_min_cosine": round(float(cos.min()), 6),
            "online_vs_cpu_fp32_max_abs_diff": float((got - ref).abs().max()), "online_dtype": str(got.dtype)}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dry-run", action="store_true", help="tiny sizes on the CPU (checks the code paths)")
    p.add_argument("--out", default="artifacts/gpu_check.json")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("error: no CUDA GPU here; use --dry-run to check the code paths on the CPU", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cpu" if args.dry_run else "cuda")
    n, batch, repeats = (32, 16, 1) if args.dry_run else (8192, 512, 5)
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    unet = UNet2DModel(**(TINY_UNET if args.dry_run else CIFAR_UNET)).to(device).eval().requires_grad_(False)
    model = DiffusionModel(unet, make_scheduler(1000, "linear"), None, None, 32, 3, "random", "random")
    t0 = time.perf_counter()
    res = {"device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu (dry run)",
           "torch": torch.__version__, "unet_params_m": round(sum(q.numel() for q in unet.parameters()) / 1e6, 2)}
    res |= extract_figures(model, n, batch, device, repeats)
    for arch in (("cnn",) if args.dry_run else ("preact-resnet18", "wrn-28-10")):
        res |= step_figures(arch, model, 8 if args.dry_run else batch, device, repeats)
    res |= equality_figure(model, device, 8 if args.dry_run else 64)
    res["seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(res, indent=2) + "\n")
    width = max(map(len, res))
    print("\n".join(f"{k:{width}s}  {v}" for k, v in res.items()))
    print(f"-> {out}")
    return res


if __name__ == "__main__":
    main()

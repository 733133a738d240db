"""Defaults of `generate`."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum

from pipeline.classifiers.archs import Arch
from pipeline.core.config import coerce_enums, require


class Filter(str, Enum):
    none = "none"  # keep every sample with its intended label
    agree = "agree"  # keep samples the reference classifier assigns to their intended class with confidence >= --min-confidence (per-class quotas: the set stays balanced)
    relabel = "relabel"  # pseudo-labels (Gowal et al. 2021): keep samples whose predicted class has confidence >= --min-confidence, labelled with it


class Sampler(str, Enum):
    ddim = "ddim"  # DDIM (--eta sets its noise)
    dpm = "dpm"  # DPM-Solver++ (multistep)


@dataclass(frozen=True)
class GenerateConfig:
    model: str = "artifacts/diffusion"  # the diffusion model folder (from `diffusion`)
    real_train: str = "artifacts/shards/real/train"  # the real train split: the check classifier (and the pseudo-labeller of unconditional models)
    out: str = "artifacts/shards/synthetic"  # output folder (path or fsspec URL)
    n: int = 3000  # synthetic images to generate
    sampler: Sampler = Sampler.ddim  # the diffusion sampler
    sample_steps: int = 20  # denoising steps per image
    eta: float = 1.0  # DDIM noise: 1 ancestral (robust for a briefly trained model), 0 deterministic ODE
    guidance: float = 1.0  # classifier-free guidance scale (1.0: none)
    # conditional models: filter the samples with the reference classifier (the kept fraction is
    # recorded in the shards' fingerprint); unconditional models are always pseudo-labelled
    filter: Filter = Filter.none
    min_confidence: float = 0.9  # the reference classifier's softmax confidence a kept sample needs (filters, pseudo-labels)
    batch_size: int = 250  # images sampled at once
    shard_size: int = 10_000  # images per tar shard
    bf16: bool = True  # autocast for the UNet forward on GPUs and on CPUs with native bf16; fp32 elsewhere
    check: bool = True  # the quality report: agreement, Frechet distance and precision/recall in a reference classifier's features
    real_test: str = "artifacts/shards/real/test"  # the check classifier's test accuracy ("" skips)
    # the reference classifier (quality report, filters, pseudo-labels): trained on the real train
    # split only; measured on Fashion-MNIST: resnet 5 epochs on all 60k images 91.75% test accuracy
    # (cnn: 88.4% at 4 epochs, 90.0% at 10)
    classifier_arch: Arch = Arch.resnet
    # a reference classifier saved by an earlier generate run (its OUT/reference): reused instead of
    # training one, so every setting of a comparison is judged by the same classifier
    reference: str = ""
    classifier_epochs: int = 5  # epochs of the reference classifier
    classifier_limit: int = 0  # train it on the first N real train images (0: all)
    classifier_nuisance: bool = True  # train it with random background level + pixel noise (judge shapes)
    quality_n: int = 2000  # images of each side (real test, generated) in the distance and precision/recall
    seed: int = 0  # noise and labels (each shard is a function of it and its index)

    def __post_init__(self) -> None:
        coerce_enums(self)

    def validate(self) -> None:
        require(self, [
            (min(self.n, self.batch_size, self.shard_size, self.sample_steps) > 0,
             "--n, --batch-size, --shard-size and --sample-steps must be positive"),
            (0.0 <= self.eta <= 1.0, f"--eta must be in [0, 1], got {self.eta}"),
            (self.guidance >= 0 and 0.0 <= self.min_confidence < 1.0,
             f"--guidance must be >= 0 and --min-confidence in [0, 1), got {self.guidance}, {self.min_confidence}"),
            (self.classifier_epochs > 0 and self.classifier_limit >= 0,
             "--classifier-epochs must be positive and --classifier-limit >= 0"),
            (self.quality_n >= 10, f"--quality-n must be >= 10, got {self.quality_n}")])

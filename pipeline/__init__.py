"""Offline diffusion feature cache for adversarial training with representation alignment."""

__version__ = "0.1.0"

"""Per-step schedules of a run: the learning rate and the DRA weight at optimizer step ``step`` of ``total``."""

from __future__ import annotations

import math

from pipeline.train.config import DRASchedule, LRSchedule


def lr_at(step: int, total: int, base: float, kind: LRSchedule) -> float:
    """Per-step learning rate. onecycle: linear warmup from base/25 over 30%, then cosine to 0."""
    p = min(step / max(total, 1), 1.0)
    if kind is LRSchedule.cosine:
        return base * 0.5 * (1 + math.cos(math.pi * p))
    if p < 0.3:
        return base * (1 / 25 + (1 - 1 / 25) * p / 0.3)
    return base * 0.5 * (1 + math.cos(math.pi * (p - 0.3) / 0.7))


def dra_weight_at(step: int, total: int, weight: float, kind: DRASchedule) -> float:
    p = min(step / max(total, 1), 1.0)
    if kind is DRASchedule.linear_warmup:
        return weight * min(1.0, p / 0.25)
    if kind is DRASchedule.cosine_decay:
        return weight * 0.5 * (1 + math.cos(math.pi * p))
    return weight

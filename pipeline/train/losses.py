"""Training losses as pure tensor functions. Each returns its terms separately, unweighted.

The training loop weights and sums them (``total = ce + beta * kl + lambda * dra``) and logs each
term, so a sweep over a weight never needs a new loss function, and the log shows which term
moved. Nothing here touches a model, an optimizer or a train/eval mode.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def pgd_at_loss(logits_adv: torch.Tensor, y: torch.Tensor, *,
                label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """PGD-AT (Madry): cross-entropy on the adversarial examples. Terms: ``ce``."""
    return {"ce": F.cross_entropy(logits_adv, y, label_smoothing=label_smoothing)}


def trades_loss(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor, *,
                label_smoothing: float = 0.0) -> dict[str, torch.Tensor]:
    """TRADES (Zhang et al. 2019). Terms: ``ce`` on clean inputs, ``kl`` = KL(p_clean || p_adv).

    The objective is ``ce + beta * kl`` (beta = 6 in the paper); the loop applies beta. The KL is
    averaged over the batch (``batchmean``), as in the reference implementation.
    """
    ce = F.cross_entropy(logits_clean, y, label_smoothing=label_smoothing)
    kl = F.kl_div(F.log_softmax(logits_adv, 1), F.softmax(logits_clean, 1), reduction="batchmean")
    return {"ce": ce, "kl": kl}


def dra_loss(pred: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """DRA alignment: mean over the batch of ``1 - cos(pred, target)``. Terms: ``dra``.

    ``pred`` is the projection head's output on the adversarial view; ``target`` is the (already
    normalised) diffusion embedding of the clean view. Targets carry no gradient.
    """
    cos = F.cosine_similarity(pred, target.detach().to(pred.dtype), dim=1, eps=1e-8)
    return {"dra": (1 - cos).mean()}

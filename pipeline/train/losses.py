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
    """DRA alignment: the mean of ``1 - cos`` over the batch (and locations). Terms: ``dra``.

    ``pred`` is the projection head's output; ``target`` the (already normalised) diffusion
    embedding of the clean view, of the same shape. Targets carry no gradient. The cosine is taken
    over dimension 1:

    - vector targets (B, D) (pooling ``mean``, or ``flatten`` = a whole C x H x W map as ONE
      vector): one cosine per sample, ``mean_b (1 - cos(pred_b, target_b))``;
    - grid targets (B, C, G, G) (pooling ``grid4``/``grid7``): one cosine over the C channels at each
      of the G*G locations, ``mean_{b, l} (1 - cos(pred_{b,:,l}, target_{b,:,l}))``. This is REPA's
      projection loss (sihyun-yu/REPA ``loss.py``, ``SILoss.__call__``: ``mean_flat(-(z_j * z_tilde_j).sum(-1))``
      of L2-normalised token features, averaged over the batch) plus the constant 1.
    """
    cos = F.cosine_similarity(pred, target.detach().to(pred.dtype), dim=1, eps=1e-8)
    return {"dra": (1 - cos).mean()}

"""Training losses: 0.5·BCE + soft Dice for masks, cross-entropy for the class, as pure functions."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["seg_loss_per_sample", "masked_seg_loss", "multitask_loss"]


def seg_loss_per_sample(logits: Tensor, target: Tensor, smooth: float = 1.0) -> Tensor:
    """0.5·BCE(logits) + soft Dice(sigmoid), per sample. logits, target: B×1×H×W → B (fp32)."""
    logits = logits.float()
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)  # B
    prob = torch.sigmoid(logits).flatten(1)  # B×HW
    t = target.flatten(1)  # B×HW
    dice = 1 - (2 * (prob * t).sum(1) + smooth) / (prob.sum(1) + t.sum(1) + smooth)  # B
    return 0.5 * bce + dice


def masked_seg_loss(logits: Tensor, target: Tensor, include: Tensor) -> Tensor:
    """Mean segmentation loss over the samples where `include` (bool B) is true.

    With no sample included the result is an exact 0 whose gradient is exactly 0.
    """
    per = seg_loss_per_sample(logits, target)  # B
    w = include.to(per.dtype)
    return (per * w).sum() / w.sum().clamp_min(1.0)


def multitask_loss(out: dict[str, Tensor | None], batch: dict, weights: dict[str, float],
                   infection_classes: list[int]) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the lung, infection and class losses; returns (total, per-task losses).

    The infection loss counts only samples whose label is in `infection_classes` and that carry an
    infection mask; tasks whose weight is 0 (or whose output is absent) are left out.
    """
    parts: dict[str, Tensor] = {"lung": seg_loss_per_sample(out["lung"], batch["lung"]).mean()}
    if weights.get("inf", 0.0) > 0 and out.get("inf") is not None:
        classes = torch.as_tensor(infection_classes, device=batch["label"].device)
        include = torch.isin(batch["label"], classes) & batch["has_inf"].bool()
        parts["inf"] = masked_seg_loss(out["inf"], batch["inf"], include)
    parts["cls"] = F.cross_entropy(out["cls"].float(), batch["label"])
    total = sum(weights.get(k, 0.0) * v for k, v in parts.items())
    return total, parts

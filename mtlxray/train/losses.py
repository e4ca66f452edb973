"""Training losses: w·BCE + soft Dice for masks (w = phase.bce_weight, 0.5 by default), cross-entropy
for the class, as pure functions computed in fp32 whatever the autocast dtype."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["seg_loss_per_sample", "masked_seg_loss", "multitask_loss", "phase_loss"]


def seg_loss_per_sample(logits: Tensor, target: Tensor, smooth: float = 1.0, bce_weight: float = 0.5) -> Tensor:
    """bce_weight·BCE(logits) + soft Dice(sigmoid), per sample. logits, target: B×1×H×W → B (fp32)."""
    logits = logits.float()
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)  # B
    prob = torch.sigmoid(logits).flatten(1)  # B×HW
    t = target.flatten(1)  # B×HW
    dice = 1 - (2 * (prob * t).sum(1) + smooth) / (prob.sum(1) + t.sum(1) + smooth)  # B
    return bce_weight * bce + dice


def masked_seg_loss(logits: Tensor, target: Tensor, include: Tensor, *, bce_weight: float = 0.5,
                    mean_over: str = "positives") -> Tensor:
    """Segmentation loss summed over the samples where `include` (bool B) is true, divided by the
    number of included samples (`mean_over="positives"`) or by the batch size (`"batch"`).

    Excluded samples are selected away, not multiplied by 0, so a nan or inf in one of them (an
    unannotated mask, a diverging head) never reaches the loss or the gradient. With no sample
    included the result is an exact 0 whose gradient is exactly 0.
    """
    keep = include.view(-1, *([1] * (logits.dim() - 1)))  # B×1×1×1
    # Select the inputs too: the backward of a select passes an exact 0 to the excluded logits,
    # where the loss's own derivative (0 · nan) would pass nan.
    per = seg_loss_per_sample(torch.where(keep, logits, 0.0), target, bce_weight=bce_weight)  # B
    kept = torch.where(include, per, torch.zeros_like(per))  # B
    count = include.sum().to(per.dtype).clamp_min(1.0) if mean_over == "positives" else per.new_tensor(
        max(1, per.shape[0]))
    return kept.sum() / count


def multitask_loss(out: dict[str, Tensor | None], batch: dict, weights: dict[str, float],
                   infection_classes: list[int], *, bce_weight: float = 0.5,
                   inf_mean_over: str = "positives") -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the lung, infection and class losses; returns (total, per-task losses).

    The infection loss counts only samples whose label is in `infection_classes` and that carry an
    infection mask (averaged over those, or over the batch: `inf_mean_over`); tasks whose weight
    is 0, or whose output the model does not produce, are left out.
    """
    parts: dict[str, Tensor] = {}
    if weights.get("lung", 0.0) > 0 and out.get("lung") is not None:
        parts["lung"] = seg_loss_per_sample(out["lung"], batch["lung"], bce_weight=bce_weight).mean()
    if weights.get("inf", 0.0) > 0 and out.get("inf") is not None:
        classes = torch.as_tensor(infection_classes, device=batch["label"].device)
        include = torch.isin(batch["label"], classes) & batch["has_inf"].bool()
        parts["inf"] = masked_seg_loss(out["inf"], batch["inf"], include, bce_weight=bce_weight,
                                       mean_over=inf_mean_over)
    if weights.get("cls", 0.0) > 0 and out.get("cls") is not None:
        parts["cls"] = F.cross_entropy(out["cls"].float(), batch["label"])
    total = sum(weights.get(k, 0.0) * v for k, v in parts.items())
    return total, parts


def phase_loss(out: dict[str, Tensor | None], batch: dict, phase) -> tuple[Tensor, dict[str, Tensor]]:
    """`multitask_loss` with every setting taken from a `PhaseConfig`."""
    return multitask_loss(out, batch, phase.loss_weights, phase.infection_classes, bce_weight=phase.bce_weight,
                          inf_mean_over=phase.inf_loss_mean)

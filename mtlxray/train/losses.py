"""Training losses: w·BCE + soft Dice for masks (w = phase.bce_weight, 0.5 as the Swin-UNet paper's
equation 1 has it; or BCE alone, or Dice alone: phase.seg_loss), cross-entropy
(or, with model.cls_loss=bce_multilabel, a sigmoid BCE per class) for the class, the detection
head's loss (`mtlxray.model.detection`), as pure functions computed in fp32 whatever the autocast
dtype."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from mtlxray.model.detection import detection_loss

__all__ = ["seg_loss_per_sample", "masked_seg_loss", "class_loss", "multitask_loss", "phase_loss"]


SEG_LOSSES = ("bce_dice", "bce", "dice")


def seg_loss_per_sample(logits: Tensor, target: Tensor, smooth: float = 1.0, bce_weight: float = 0.5,
                        kind: str = "bce_dice") -> Tensor:
    """A mask loss per sample. logits, target: B×1×H×W → B (fp32). `kind`: `bce_dice`,
    bce_weight·BCE(logits) + soft Dice(sigmoid); `bce`, BCE alone (MultiCheXNet's); `dice`, soft Dice alone."""
    if kind not in SEG_LOSSES:
        raise ValueError(f"unknown mask loss {kind!r} ({', '.join(SEG_LOSSES)})")
    logits = logits.float()
    target = target.float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)  # B
    if kind == "bce":
        return bce
    prob = torch.sigmoid(logits).flatten(1)  # B×HW
    t = target.flatten(1)  # B×HW
    dice = 1 - (2 * (prob * t).sum(1) + smooth) / (prob.sum(1) + t.sum(1) + smooth)  # B
    return dice if kind == "dice" else bce_weight * bce + dice


def masked_seg_loss(logits: Tensor, target: Tensor, include: Tensor, *, bce_weight: float = 0.5,
                    mean_over: str = "positives", kind: str = "bce_dice") -> Tensor:
    """Segmentation loss summed over the samples where `include` (bool B) is true, divided by the
    number of included samples (`mean_over="positives"`) or by the batch size (`"batch"`).

    Excluded samples are selected away, not multiplied by 0, so a nan or inf in one of them (an
    unannotated mask, a diverging head) never reaches the loss or the gradient. With no sample
    included the result is an exact 0 whose gradient is exactly 0.
    """
    keep = include.view(-1, *([1] * (logits.dim() - 1)))  # B×1×1×1
    # Select the inputs too: the backward of a select passes an exact 0 to the excluded logits,
    # where the loss's own derivative (0 · nan) would pass nan.
    per = seg_loss_per_sample(torch.where(keep, logits, 0.0), target, bce_weight=bce_weight, kind=kind)  # B
    kept = torch.where(include, per, torch.zeros_like(per))  # B
    count = include.sum().to(per.dtype).clamp_min(1.0) if mean_over == "positives" else per.new_tensor(
        max(1, per.shape[0]))
    return kept.sum() / count


def class_loss(logits: Tensor, labels: Tensor, kind: str = "ce") -> Tensor:
    """Mean class loss. logits: B×C, labels: B class indices.

    `ce`: softmax cross-entropy. `bce_multilabel`: each class's logit is a separate sigmoid,
    scored by binary cross-entropy against the one-hot label, averaged over classes and images
    (MultiCheXNet's classifier; the data hold one label per image).
    """
    logits = logits.float()
    if kind == "ce":
        return F.cross_entropy(logits, labels)
    if kind == "bce_multilabel":
        target = F.one_hot(labels, logits.shape[1]).to(logits.dtype)  # B×C
        return F.binary_cross_entropy_with_logits(logits, target)
    raise ValueError(f"unknown class loss {kind!r} (ce or bce_multilabel)")


def _zero_term(output: Tensor) -> Tensor:
    """An exact 0 whose gradient reaches `output` as exact zeros (never 0·nan), keeping the head that
    produced it in the autograd graph: under DDP every trained parameter must get a gradient."""
    return torch.where(torch.zeros((), dtype=torch.bool, device=output.device), output.float().sum(), 0.0)


def multitask_loss(out: dict[str, Tensor | None], batch: dict, weights: dict[str, float],
                   positive_classes: list[int], *, bce_weight: float = 0.5, seg_loss: str = "bce_dice",
                   inf_mean_over: str = "positives", cls_loss: str = "ce", include: Optional[Tensor] = None,
                   carried: Optional[Sequence[str]] = None, kbox_confidence: bool = False
                   ) -> tuple[Tensor, dict[str, Tensor]]:
    """Weighted sum of the lung, infection, class and detection losses; returns (total, per-task losses).

    Positive-case training: the infection and detection losses count only the samples in
    `include` (B bool; default: labels in `positive_classes`, see `mtlxray.train.teacher_forcing` for the
    teacher-forced choice) that carry an infection mask; the infection loss is averaged over those,
    or over the batch (`inf_mean_over`), the detection loss over their boxes. Tasks whose weight is
    0, or whose output the model does not produce, are left out. `cls_loss`: see `class_loss`.

    `seg_loss`: the mask loss (`seg_loss_per_sample`'s kind).
    `carried`: the labels this batch has (`data.sources`; None: all). A weighted task outside it
    has no loss part and adds an exact zero with an exactly zero gradient to its head.
    """
    parts: dict[str, Tensor] = {}
    idle: list[Tensor] = []

    def wanted(task: str) -> bool:
        if weights.get(task, 0.0) <= 0 or out.get(task) is None:
            return False
        if carried is None or task in carried:
            return True
        idle.append(out[task])
        return False

    if include is None:
        include = torch.isin(batch["label"], torch.as_tensor(positive_classes, device=batch["label"].device))
    include = include & batch["has_inf"].bool()
    if wanted("lung"):
        parts["lung"] = seg_loss_per_sample(out["lung"], batch["lung"], bce_weight=bce_weight, kind=seg_loss).mean()
    if wanted("inf"):
        parts["inf"] = masked_seg_loss(out["inf"], batch["inf"], include, bce_weight=bce_weight,
                                       mean_over=inf_mean_over, kind=seg_loss)
    if wanted("cls"):
        parts["cls"] = class_loss(out["cls"], batch["label"], cls_loss)
    if wanted("det"):
        parts["det"] = detection_loss(out["det"], out.get("det_points"), batch["boxes"], include,
                                      tuple(batch["img"].shape[-2:]), kbox_confidence=kbox_confidence)
    total = sum(weights.get(k, 0.0) * v for k, v in parts.items())
    for output in idle:
        total = total + _zero_term(output)
    return total, parts


def phase_loss(out: dict[str, Tensor | None], batch: dict, phase, cls_loss: str = "ce", *,
               include: Optional[Tensor] = None, kbox_confidence: bool = False) -> tuple[Tensor, dict[str, Tensor]]:
    """`multitask_loss` with every setting taken from a `PhaseConfig` (and `model.cls_loss`,
    `model.det_kbox_confidence`); the
    labels a batch carries come from its `tasks` entry (`data.sources`), all when it has none."""
    return multitask_loss(out, batch, phase.loss_weights, phase.positive_classes, bce_weight=phase.bce_weight,
                          seg_loss=phase.seg_loss, inf_mean_over=phase.inf_loss_mean, cls_loss=cls_loss, include=include,
                          carried=batch.get("tasks"), kbox_confidence=kbox_confidence)

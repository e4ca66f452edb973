"""Segmentation and classification metrics as pure functions on tensors.

Nothing here knows about processes: callers gather the per-image counts (`seg_counts`), the
predictions and the labels across ranks first, then summarise.

Conventions for 0/0:
- per-image segmentation ratios (Dice, IoU, sensitivity, specificity) are 1 when their
  denominator is 0, e.g. Dice of an empty prediction against an empty mask is 1;
- per-class classification precision, recall, specificity and F1 are 0 when their denominator
  is 0 (a class never predicted has precision 0), as scikit-learn's `zero_division=0`;
- macro averages are over the classes present in the truth: a class with no true images has no
  recall or F1 to speak of, so it is left out instead of counting as 0 (scikit-learn with
  `labels=<classes present in y_true>`). A perfect prediction therefore scores 1 on any subset
  of classes, and bootstrap resamples that miss a class are not dragged down by it;
- AUC is nan for a class with no positives or no negatives;
- summaries over zero images are nan.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

SEG_METRICS = ("dice", "iou", "pixel_accuracy", "sensitivity", "specificity")


def seg_counts(pred: Tensor, target: Tensor) -> Tensor:
    """Per-image confusion counts of binary masks.

    pred, target: B×1×H×W (or B×H×W), bool or 0/1 values. Returns int64 B×4: (tp, fp, fn, tn).
    """
    if pred.shape != target.shape:
        raise ValueError(f"seg_counts: pred shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
    p = pred.reshape(pred.shape[0], -1).bool()  # B×HW
    t = target.reshape(target.shape[0], -1).bool()  # B×HW
    tp = (p & t).sum(1)
    fp = (p & ~t).sum(1)
    fn = (~p & t).sum(1)
    tn = (~p & ~t).sum(1)
    return torch.stack([tp, fp, fn, tn], dim=1).long()  # B×4


def _ratio(num: Tensor, den: Tensor, empty: float) -> Tensor:
    """num / den in float64, `empty` where den == 0."""
    num, den = num.double(), den.double()
    return torch.where(den > 0, num / den.clamp_min(1), torch.full_like(num, empty))


def dice(counts: Tensor) -> Tensor:
    """Per-image Dice 2tp / (2tp + fp + fn); 1 when both masks are empty. counts: B×4 → B."""
    tp, fp, fn, _ = counts.unbind(-1)
    return _ratio(2 * tp, 2 * tp + fp + fn, 1.0)


def iou(counts: Tensor) -> Tensor:
    """Per-image IoU tp / (tp + fp + fn); 1 when both masks are empty. counts: B×4 → B."""
    tp, fp, fn, _ = counts.unbind(-1)
    return _ratio(tp, tp + fp + fn, 1.0)


def pixel_accuracy(counts: Tensor) -> Tensor:
    """Per-image (tp + tn) / all pixels. counts: B×4 → B."""
    tp, _, _, tn = counts.unbind(-1)
    return _ratio(tp + tn, counts.sum(-1), 1.0)


def sensitivity(counts: Tensor) -> Tensor:
    """Per-image recall tp / (tp + fn); 1 when the truth mask is empty. counts: B×4 → B."""
    tp, _, fn, _ = counts.unbind(-1)
    return _ratio(tp, tp + fn, 1.0)


def specificity(counts: Tensor) -> Tensor:
    """Per-image tn / (tn + fp); 1 when the truth mask covers the whole image. counts: B×4 → B."""
    _, fp, _, tn = counts.unbind(-1)
    return _ratio(tn, tn + fp, 1.0)


_SEG_FUNCS: dict[str, Callable[[Tensor], Tensor]] = {
    "dice": dice, "iou": iou, "pixel_accuracy": pixel_accuracy,
    "sensitivity": sensitivity, "specificity": specificity,
}


def seg_summary(counts: Tensor, prefix: str) -> dict[str, float]:
    """Mean-over-images and global figures of every segmentation metric.

    Keys are f"{prefix}{metric}" (mean of the per-image values) and f"{prefix}{metric}_global"
    (the metric of the counts summed over all images), e.g. prefix "lung_" gives "lung_dice" and
    "lung_dice_global". With zero images every value is nan.
    """
    out: dict[str, float] = {}
    total = counts.sum(0, keepdim=True)  # 1×4
    for name, fn in _SEG_FUNCS.items():
        if counts.shape[0] == 0:
            out[f"{prefix}{name}"] = math.nan
            out[f"{prefix}{name}_global"] = math.nan
        else:
            out[f"{prefix}{name}"] = fn(counts).mean().item()
            out[f"{prefix}{name}_global"] = fn(total)[0].item()
    return out


def confusion_matrix(pred: Tensor, target: Tensor, num_classes: int) -> Tensor:
    """int64 C×C matrix; row = true class, column = predicted class. pred, target: N class indices."""
    pred, target = pred.reshape(-1).long(), target.reshape(-1).long()
    if pred.shape != target.shape:
        raise ValueError(f"confusion_matrix: {pred.numel()} predictions for {target.numel()} labels")
    for name, t in (("pred", pred), ("target", target)):
        if t.numel() and (t.min() < 0 or t.max() >= num_classes):
            raise ValueError(f"confusion_matrix: {name} outside [0, {num_classes})")
    flat = torch.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return flat.reshape(num_classes, num_classes)


def classification_summary(confusion: Tensor, class_names: Sequence[str]) -> dict[str, float]:
    """Accuracy, macro and per-class precision, recall, specificity and F1 from a confusion matrix.

    Keys: "accuracy", "<metric>_macro" and "<metric>/<class name>" for metric in precision, recall,
    specificity, f1. Ratios with a zero denominator are 0; macro averages cover the classes
    present in the truth (see the module docstring).
    """
    cm = confusion.double()
    if cm.shape != (len(class_names), len(class_names)):
        raise ValueError(f"classification_summary: confusion {tuple(cm.shape)} for {len(class_names)} classes")
    total = cm.sum()
    tp = cm.diag()
    fp = cm.sum(0) - tp
    fn = cm.sum(1) - tp
    tn = total - tp - fp - fn
    per = {
        "precision": _ratio(tp, tp + fp, 0.0),
        "recall": _ratio(tp, tp + fn, 0.0),
        "specificity": _ratio(tn, tn + fp, 0.0),
        "f1": _ratio(2 * tp, 2 * tp + fp + fn, 0.0),
    }
    out = {"accuracy": (tp.sum() / total).item() if total > 0 else math.nan}
    present = cm.sum(1) > 0
    for metric, values in per.items():
        out[f"{metric}_macro"] = values[present].mean().item() if present.any() else math.nan
        for name, v in zip(class_names, values.tolist()):
            out[f"{metric}/{name}"] = v
    return out


def _average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of x (N), tied values sharing their mean rank."""
    _, inverse, counts = torch.unique(x, sorted=True, return_inverse=True, return_counts=True)
    ends = counts.cumsum(0).double()  # last 1-based rank of each distinct value
    mean_rank = ends - (counts.double() - 1) / 2
    return mean_rank[inverse]


def roc_auc_ovr(probs: Tensor, labels: Tensor) -> list[float]:
    """One-vs-rest ROC AUC per class (Mann-Whitney U from mean ranks, so ties count one half).

    probs: N×C scores, labels: N class indices. A class with no positives or no negatives gets nan.
    """
    labels = labels.reshape(-1).long()
    out = []
    for c in range(probs.shape[1]):
        pos = labels == c
        n_pos, n_neg = int(pos.sum()), int((~pos).sum())
        if n_pos == 0 or n_neg == 0:
            out.append(math.nan)
            continue
        ranks = _average_ranks(probs[:, c].double())
        u = ranks[pos].sum().item() - n_pos * (n_pos + 1) / 2
        out.append(u / (n_pos * n_neg))
    return out


def bootstrap_ci(fn: Callable[[Tensor], float], n_items: int, n_boot: int, seed: int,
                 alpha: float = 0.05) -> tuple[float, float]:
    """Percentile bootstrap interval of a statistic over items.

    `fn(idx)` computes the statistic on the items at `idx` (an int64 tensor of n_items indices drawn
    with replacement). Resamples where `fn` gives nan are dropped; (nan, nan) if none remain.
    """
    if n_items <= 0 or n_boot <= 0:
        return math.nan, math.nan
    gen = torch.Generator().manual_seed(seed)
    stats = []
    for _ in range(n_boot):
        idx = torch.randint(0, n_items, (n_items,), generator=gen)
        stats.append(float(fn(idx)))
    values = torch.tensor(stats, dtype=torch.float64)
    values = values[~values.isnan()]
    if values.numel() == 0:
        return math.nan, math.nan
    q = torch.tensor([alpha / 2, 1 - alpha / 2], dtype=torch.float64)
    lo, hi = torch.quantile(values, q).tolist()
    return lo, hi

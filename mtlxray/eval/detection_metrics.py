"""Detection metrics of infection boxes: mAP through torchmetrics, and false positives on negatives.

`mean_average_precision` is torchmetrics' `MeanAveragePrecision` (COCO's definition: 101-point
interpolated precision, up to 100 boxes per image) with the faster-coco-eval backend, or
pycocotools where only that is installed; mtlxray does not reimplement it. Infection is one
class. `det_summary` turns an evaluation's per-image candidates (`mtlxray.eval.records.Records.det`)
into the kept boxes (NMS, `mtlxray.model.detection.postprocess`) and the metrics:

- `det_map` (mAP@[.5:.95]) and `det_map_50` (mAP@0.5) over the images annotated with infection
  (their boxes are the ground truth; an annotated negative with no box still counts every box
  predicted on it as a false positive), `det_n` such images;
- `det_fp_share`: the share of negative images (labels outside the positive classes) with any box
  scoring at least `model.det_score_threshold`; `det_negatives_n`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from mtlxray.model.detection import postprocess

__all__ = ["mean_average_precision", "kept_boxes", "det_summary", "map_backend"]


def map_backend() -> str:
    """torchmetrics' COCO backend: faster_coco_eval when installed, else pycocotools."""
    import importlib.util

    return "faster_coco_eval" if importlib.util.find_spec("faster_coco_eval") else "pycocotools"


def mean_average_precision(preds: Sequence[Tensor], targets: Sequence[Sequence[Sequence[float]]]) -> dict[str, float]:
    """mAP of one class: preds, per image, M×5 (x0, y0, x1, y1, score); targets, per image, its
    ground-truth boxes. Returns {"map", "map_50"} (nan when there is no ground-truth box)."""
    from torchmetrics.detection import MeanAveragePrecision

    if not any(len(t) for t in targets):
        return {"map": math.nan, "map_50": math.nan}
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend=map_backend())
    p = [{"boxes": b[:, :4].float(), "scores": b[:, 4].float(), "labels": torch.zeros(len(b), dtype=torch.long)}
         for b in preds]
    t = [{"boxes": torch.tensor([list(map(float, x)) for x in boxes], dtype=torch.float32).reshape(-1, 4),
          "labels": torch.zeros(len(boxes), dtype=torch.long)} for boxes in targets]
    metric.update(p, t)
    result = metric.compute()
    return {k: (math.nan if float(result[k]) < 0 else float(result[k])) for k in ("map", "map_50")}


def kept_boxes(det: Tensor, nms_iou: float, max_boxes: int) -> list[Tensor]:
    """Per image (det: N×k×5 candidates) the boxes kept after NMS, M×5, best first."""
    return [postprocess(c, nms_iou, max_boxes) for c in det]


def det_summary(det: Tensor, gt_boxes: Sequence[Sequence], annotated: Tensor, negative: Tensor, *,
                score_threshold: float, nms_iou: float, max_boxes: int,
                passed: Optional[Tensor] = None) -> tuple[dict[str, float], list[list[list[float]]]]:
    """(metrics, reported boxes per image) of candidates `det` (N×k×5). `annotated`/`negative`: N
    bool. With `passed` (N bool, the gate's decisions) the gated metrics are added (suffix
    `_gated`): an image the gate stops reports no box."""
    kept = kept_boxes(det, nms_iou, max_boxes)
    reported = [b[b[:, 4] >= score_threshold] for b in kept]
    idx = annotated.nonzero().flatten().tolist()
    values: dict[str, float] = {"det_n": len(idx), "det_negatives_n": int(negative.sum())}

    def add(suffix: str, boxes: list[Tensor], shown: list[Tensor]) -> None:
        m = mean_average_precision([boxes[i] for i in idx], [gt_boxes[i] for i in idx])
        values[f"det_map{suffix}"], values[f"det_map_50{suffix}"] = m["map"], m["map_50"]
        any_box = torch.tensor([len(b) > 0 for b in shown], dtype=torch.bool)
        values[f"det_fp_share{suffix}"] = any_box[negative].double().mean().item() if negative.any() else math.nan

    add("", kept, reported)
    if passed is not None:
        stop = [not bool(p) for p in passed]
        add("_gated", [b[:0] if s else b for b, s in zip(kept, stop)], [b[:0] if s else b for b, s in zip(reported, stop)])
    shown = [[[round(float(v), 2) for v in row] for row in b.tolist()] for b in reported]
    return values, shown

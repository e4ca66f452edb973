"""One evaluation for training-time validation and `mtlxray evaluate`: per-image records, one summary.

A `RecordCollector` turns each batch's model outputs into small per-image records (confusion
counts of the masks, predicted areas, class probabilities, the label), kept on the device until
the end so that evaluating a batch never waits for the host (on the CPU, as Python numbers).
`Records` from every rank are gathered once, de-duplicated by sample key, and `summarise` computes every metric under one set
of names, which training logs as `val/<name>` and `evaluate` writes to metrics.json:

- `n_images`;
- `lung_<m>` and `lung_<m>_global` for m in dice, iou, pixel_accuracy, sensitivity, specificity
  (mean over images, and from counts pooled over images), and `lung_n`;
- `inf_<m>`, `inf_<m>_global`, `inf_n`: the same on positive images (a label in the infection
  classes, COVID-19 by default) that carry an infection mask;
- `inf_fp_share` and `inf_fp_area_pct` on negative images (labels outside the infection classes):
  the share with any predicted infection pixel, and the mean predicted infection area inside the
  predicted lung as a percentage of the predicted lung; `inf_negatives_n`; `inf_positives_n`, the
  positive images with or without an infection mask;
- counts (`n_images` and every `*_n`) are ints;
- `accuracy`, `<m>_macro` and `<m>/<class>` for m in precision, recall, specificity, f1, auc
  (the predicted class is the most probable one; AUC is one-vs-rest on each class's probability);
- with a multi-label class head (`model.cls_loss: bce_multilabel`, probabilities are independent
  sigmoids): also `f1_at_0.5/<class>` and `f1_at_0.5_macro`, each class's F1 when its sigmoid is
  thresholded at 0.5 on its own (an image may then be predicted in no class or in several);
- with a detection head (`model.det_head`): `det_map` (mAP@[.5:.95]), `det_map_50`, `det_n`,
  `det_fp_share` (negative images with a box scoring at least `model.det_score_threshold`) and
  `det_negatives_n` (see `mtlxray.eval.detection_metrics`);
- with a gate (`phase.teacher_forcing.gate`, or evaluate's `--gate-source`): `gate_sensitivity`
  and `gate_specificity` (positives passed, negatives stopped), and the same infection and box
  figures as an image the gate stops reports them (no mask, no box): `inf_dice_gated`,
  `inf_fp_share_gated`, `inf_fp_area_pct_gated`, `det_map_gated`, `det_map_50_gated`,
  `det_fp_share_gated`. "Positive" means a label in `phase.positive_classes`.

A model without an output (no infection head in phase 1, no class head in a segmentation
baseline) has no metrics of that task: its names are absent, not nan. `metric_names` lists the
names a model's evaluation produces, so a config's `run.best_metric` is checked before training.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from typing import Optional

import torch
from torch import Tensor

from mtlxray.eval import metrics as M
from mtlxray.eval.detection_metrics import det_summary
from mtlxray.model.detection import det_candidates

__all__ = ["Records", "RecordCollector", "summarise", "metric_names", "threshold_f1", "CI_METRICS"]

CI_METRICS = ("lung_dice", "inf_dice", "accuracy", "f1_macro", "precision_macro", "recall_macro", "auc_macro",
              "f1_at_0.5_macro")
"""Headline metrics that get bootstrap confidence intervals."""


_LIST_FIELDS = ("keys", "gt_boxes")
"""Fields of `Records` held as Python lists (one entry per image), not tensors."""


@dataclass
class Records:
    """Per-image evaluation records, one row per image (tensors on the CPU after `RecordCollector.records`)."""

    keys: list[str]
    labels: Tensor
    """N int64 true class."""
    inf_annotated: Tensor
    """N bool: the image carries an infection mask."""
    probs: Optional[Tensor] = None
    """N×C class probabilities (None: the model has no class output)."""
    lung: Optional[Tensor] = None
    """N×4 int64 (tp, fp, fn, tn) of the lung mask at probability 0.5 (None: no lung output)."""
    lung_area: Optional[Tensor] = None
    """N int64 predicted lung pixels."""
    inf: Optional[Tensor] = None
    """N×4 int64 (tp, fp, fn, tn) of the infection mask (None: no infection output)."""
    inf_area: Optional[Tensor] = None
    """N int64 predicted infection pixels inside the predicted lung."""
    inf_any: Optional[Tensor] = None
    """N bool: any predicted infection pixel anywhere in the image."""
    det: Optional[Tensor] = None
    """N×k×5 box candidates (x0, y0, x1, y1, score), the k best before NMS (None: no detection head)."""
    gt_boxes: Optional[list] = None
    """Per image its ground-truth infection boxes (lists, x0 y0 x1 y1 exclusive), with `det`."""
    gate: Optional[Tensor] = None
    """N float: the gate's P(positive class) (None: evaluated without a gate)."""

    def __len__(self) -> int:
        return len(self.keys)

    @staticmethod
    def concat(parts: Sequence["Records"]) -> "Records":
        parts = [p for p in parts if len(p)]
        if not parts:
            return Records([], torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.bool))
        out = {}
        for f in fields(Records):
            values = [getattr(p, f.name) for p in parts]
            if f.name in _LIST_FIELDS and all(v is not None for v in values):
                out[f.name] = [k for v in values for k in v]
            elif any(v is None for v in values):
                out[f.name] = None
            else:
                out[f.name] = torch.cat(values)
        return Records(**out)

    def take(self, idx: Sequence[int]) -> "Records":
        index = torch.as_tensor(list(idx), dtype=torch.long)
        return Records(**{f.name: (None if getattr(self, f.name) is None else
                                   [getattr(self, f.name)[i] for i in index.tolist()] if f.name in _LIST_FIELDS
                                   else getattr(self, f.name)[index])
                          for f in fields(Records)})

    def unique_by_key(self) -> "Records":
        """One row per sample key, in key order (a loader may give a rank the same sample twice)."""
        first = {}
        for i, k in enumerate(self.keys):
            first.setdefault(k, i)
        return self.take([first[k] for k in sorted(first)])


class RecordCollector:
    """Accumulates `Records` batch by batch from model outputs, without host synchronisation on an
    accelerator (on the CPU, as Python numbers).

    Class probabilities are the softmax of the class logits, or with `multilabel` (a model trained
    with `model.cls_loss: bce_multilabel`) each logit's sigmoid."""

    def __init__(self, multilabel: bool = False) -> None:
        self._parts: list[dict] = []
        self.multilabel = multilabel

    @torch.no_grad()
    def add(self, out: dict, batch: dict, gate: Optional[Tensor] = None) -> None:
        """out: the model's dict (lung/inf B×1×H×W logits, cls B×C logits, det B×N×6, or None);
        batch: a device batch with `lung`, `inf` masks, `label`, `has_inf`, `key` (and `boxes`
        with det); gate: B probabilities of a positive class under the gate (`mtlxray.train.teacher_forcing`)."""
        part: dict = {"keys": list(batch["key"]), "labels": batch["label"].detach(),
                      "inf_annotated": batch["has_inf"].detach().bool()}
        lung_pred = None
        if out.get("lung") is not None:
            lung_pred = out["lung"].detach() > 0  # logit > 0 is probability > 0.5
            part["lung"] = M.seg_counts(lung_pred, batch["lung"] > 0.5)
            part["lung_area"] = lung_pred.flatten(1).sum(1)
        if out.get("inf") is not None:
            inf_pred = out["inf"].detach() > 0
            part["inf"] = M.seg_counts(inf_pred, batch["inf"] > 0.5)
            inside = inf_pred & lung_pred if lung_pred is not None else inf_pred
            part["inf_area"] = inside.flatten(1).sum(1)
            part["inf_any"] = inf_pred.flatten(1).any(1)
        if out.get("cls") is not None:
            logits = out["cls"].detach().float()
            part["probs"] = torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)
        if out.get("det") is not None:
            part["det"] = det_candidates(out["det"], tuple(batch["img"].shape[-2:]))
            part["gt_boxes"] = [[list(b) for b in boxes] for boxes in batch["boxes"]]
        if gate is not None:
            part["gate"] = gate.detach().float()
        # On the CPU each record is kept as Python numbers: tiny tensors kept for the whole evaluation
        # pinned the heap around each batch's freed activations (glibc), and the process grew by
        # 0.2-0.9 MB an image at 256² (3.2 GiB peak over 6,788 images, 1.3 GiB over 932).
        self._parts.append({k: (v.tolist(), v.dtype) if isinstance(v, Tensor) and v.device.type == "cpu" else v
                            for k, v in part.items()})

    def records(self) -> Records:
        """Everything added so far, on the CPU (one copy per field)."""
        if not self._parts:
            return Records.concat([])
        out = {}
        for f in fields(Records):
            values = [p.get(f.name) for p in self._parts]
            if f.name in _LIST_FIELDS and all(v is not None for v in values):
                out[f.name] = [k for v in values for k in v]
            elif any(v is None for v in values):
                out[f.name] = None
            else:
                out[f.name] = torch.cat([torch.tensor(v[0], dtype=v[1]) if isinstance(v, tuple) else v
                                         for v in values]).cpu()
        return Records(**out)


def metric_names(tasks: Sequence[str], class_names: Sequence[str], multilabel: bool = False,
                 gated: bool = False) -> list[str]:
    """The metric names `summarise` produces for a model with outputs `tasks` (lung, inf, cls, det),
    a multi-label class head (`multilabel`), and records with the gate's probabilities (`gated`).

    Read off `summarise` itself on two blank images with those outputs, so that the names have one
    source; which images are positive changes no name."""
    n, c = 2, len(class_names)
    counts, zeros = torch.zeros(n, 4, dtype=torch.long), torch.zeros(n, dtype=torch.long)
    no = torch.zeros(n, dtype=torch.bool)
    probe = Records(keys=["a", "b"], labels=zeros, inf_annotated=no,
                    probs=torch.full((n, c), 1.0 / c) if "cls" in tasks else None,
                    lung=counts if "lung" in tasks else None, lung_area=zeros if "lung" in tasks else None,
                    inf=counts if "inf" in tasks else None, inf_area=zeros if "inf" in tasks else None,
                    inf_any=no if "inf" in tasks else None,
                    det=torch.zeros(n, 1, 5) if "det" in tasks else None, gt_boxes=[[], []] if "det" in tasks else None,
                    gate=torch.zeros(n) if gated else None)
    return list(summarise(probe, class_names, [0], multilabel=multilabel)["metrics"])


def threshold_f1(probs: Tensor, labels: Tensor, threshold: float = 0.5) -> tuple[list[float], float]:
    """Per-class F1 of independent decisions `probs[:, c] >= threshold` against `labels == c`, and
    their macro average over the classes present in `labels` (0/0 is 0, as in `mtlxray.eval.metrics`).

    probs: N×C, labels: N class indices. Returns ([f1 per class], macro); macro is nan with no images."""
    pred = probs >= threshold  # N×C
    truth = torch.nn.functional.one_hot(labels.long(), probs.shape[1]).bool()  # N×C
    tp = (pred & truth).sum(0).double()
    fp = (pred & ~truth).sum(0).double()
    fn = (~pred & truth).sum(0).double()
    den = 2 * tp + fp + fn
    f1 = torch.where(den > 0, 2 * tp / den.clamp_min(1), torch.zeros_like(den))
    present = truth.any(0)
    macro = f1[present].mean().item() if present.any() else math.nan
    return f1.tolist(), macro


def _macro_auc(probs: Tensor, labels: Tensor) -> float:
    values = [a for a in M.roc_auc_ovr(probs, labels) if not math.isnan(a)]
    return sum(values) / len(values) if values else math.nan


def summarise(records: Records, class_names: Sequence[str], inf_classes: Sequence[int], *,
              n_boot: int = 0, seed: int = 0, multilabel: bool = False, gate_threshold: float = 0.5,
              det_score_threshold: float = 0.3, det_nms_iou: float = 0.5, det_max_boxes: int = 10) -> dict:
    """Every metric of `records` (see the module docstring), plus the figures' raw material.

    `multilabel`: the class probabilities are independent sigmoids (`RecordCollector(multilabel=True)`);
    adds the F1 at 0.5 metrics. `inf_classes` are the positive classes (`phase.positive_classes`).
    Records with the gate's probabilities add the gated metrics, an image passing when its
    probability reaches `gate_threshold`. Boxes: NMS at `det_nms_iou`, at most `det_max_boxes`
    per image, reported from `det_score_threshold` (`model.det_*`).

    Returns {"metrics": {name: value}, "ci95": {name: [lo, hi]} (with n_boot > 0),
    "confusion": C×C list or None, "class_names", "multilabel", "class_counts", "per_image": {name: list}}.
    """
    n = len(records)
    values: dict[str, float] = {"n_images": n}
    per_image: dict[str, list] = {"key": list(records.keys), "label": records.labels.tolist()}
    boot: dict[str, Callable[[Tensor], float]] = {}
    positive = torch.isin(records.labels, torch.as_tensor(list(inf_classes), dtype=torch.long))

    def seg(task: str, counts: Tensor) -> Tensor:
        summary = M.seg_summary(counts, f"{task}_")
        values.update(summary)
        values[f"{task}_n"] = int(counts.shape[0])
        return M.dice(counts)

    if records.lung is not None:
        lung_dice = seg("lung", records.lung)
        per_image["lung_dice"] = lung_dice.tolist()
        per_image["lung_area"] = records.lung_area.tolist()
        boot["lung_dice"] = lambda idx: lung_dice[idx].mean().item()
    if records.inf is not None:
        scored = positive & records.inf_annotated
        inf_dice_all = M.dice(records.inf)
        inf_dice = seg("inf", records.inf[scored])
        per_image["inf_dice"] = [d if s else None for d, s in zip(inf_dice_all.tolist(), scored.tolist())]
        per_image["inf_area"] = records.inf_area.tolist()
        boot["inf_dice"] = lambda idx: inf_dice_all[idx][scored[idx]].mean().item() if scored[idx].any() else math.nan
        negative = ~positive
        lung_area = records.lung_area.double() if records.lung_area is not None else None
        area_pct = (100.0 * records.inf_area.double() / lung_area.clamp_min(1)) if lung_area is not None \
            else torch.zeros(n, dtype=torch.float64)
        values["inf_negatives_n"] = int(negative.sum())
        values["inf_positives_n"] = int(positive.sum())
        values["inf_fp_share"] = records.inf_any[negative].double().mean().item() if negative.any() else math.nan
        values["inf_fp_area_pct"] = area_pct[negative].mean().item() if negative.any() else math.nan
    passed = records.gate >= gate_threshold if records.gate is not None else None
    if passed is not None:
        negative = ~positive
        values["gate_sensitivity"] = passed[positive].double().mean().item() if positive.any() else math.nan
        values["gate_specificity"] = (~passed[negative]).double().mean().item() if negative.any() else math.nan
        per_image["gate_p"] = records.gate.tolist()
        if records.inf is not None:
            # A stopped image reports an empty infection mask: its true pixels become false negatives.
            tp, fp, fn, tn = records.inf.unbind(1)
            gated = torch.where(passed[:, None], records.inf, torch.stack([0 * tp, 0 * fp, tp + fn, fp + tn], 1))
            gated_dice = M.dice(gated)
            values["inf_dice_gated"] = gated_dice[scored].mean().item() if scored.any() else math.nan
            values["inf_fp_share_gated"] = (records.inf_any & passed)[negative].double().mean().item() \
                if negative.any() else math.nan
            values["inf_fp_area_pct_gated"] = (area_pct * passed)[negative].mean().item() if negative.any() else math.nan
            boot["inf_dice_gated"] = lambda idx: gated_dice[idx][scored[idx]].mean().item() if scored[idx].any() \
                else math.nan
    if records.det is not None:
        det_values, shown = det_summary(records.det, records.gt_boxes, records.inf_annotated, ~positive,
                                        score_threshold=det_score_threshold, nms_iou=det_nms_iou,
                                        max_boxes=det_max_boxes, passed=passed)
        values.update(det_values)
        per_image["det_boxes"] = shown
    confusion = None
    if records.probs is not None:
        names = list(class_names)
        preds = records.probs.argmax(1)
        confusion = M.confusion_matrix(preds, records.labels, len(names))
        cls = M.classification_summary(confusion, names)
        auc = M.roc_auc_ovr(records.probs.double(), records.labels)
        cls.update({f"auc/{c}": a for c, a in zip(names, auc)})
        present = [a for a in auc if not math.isnan(a)]
        cls["auc_macro"] = sum(present) / len(present) if present else math.nan
        values.update(cls)
        per_image["predicted"] = preds.tolist()
        per_image["probs"] = records.probs.tolist()
        probs, labels = records.probs.double(), records.labels
        boot["accuracy"] = lambda idx: (preds[idx] == labels[idx]).double().mean().item()
        boot["f1_macro"] = lambda idx: M.classification_summary(
            M.confusion_matrix(preds[idx], labels[idx], len(names)), names)["f1_macro"]
        boot["precision_macro"] = lambda idx: M.classification_summary(
            M.confusion_matrix(preds[idx], labels[idx], len(names)), names)["precision_macro"]
        boot["recall_macro"] = lambda idx: M.classification_summary(
            M.confusion_matrix(preds[idx], labels[idx], len(names)), names)["recall_macro"]
        boot["auc_macro"] = lambda idx: _macro_auc(probs[idx], labels[idx])
        if multilabel:
            per_class, macro = threshold_f1(records.probs, records.labels)
            values.update({f"f1_at_0.5/{c}": f for c, f in zip(names, per_class)})
            values["f1_at_0.5_macro"] = macro
            boot["f1_at_0.5_macro"] = lambda idx: threshold_f1(probs[idx], labels[idx])[1]
    ci = {name: list(M.bootstrap_ci(fn, n, n_boot, seed)) for name, fn in boot.items()} if n_boot > 0 else {}
    return {
        "metrics": values,
        "ci95": ci,
        "confusion": confusion.tolist() if confusion is not None else None,
        "class_names": list(class_names),
        "multilabel": multilabel,
        "class_counts": torch.bincount(records.labels, minlength=len(class_names)).tolist(),
        "per_image": per_image,
    }

"""`model.cls_loss: bce_multilabel`: the per-class sigmoid BCE loss and the metrics that fit it."""

import math

import pytest
import torch
import torch.nn.functional as F

from mtlxray import CLASS_NAMES
from mtlxray.eval.records import RecordCollector, Records, metric_names, summarise, threshold_f1
from mtlxray.report.markdown import classification_tables
from mtlxray.train.losses import class_loss


def test_class_loss_is_cross_entropy_or_the_mean_binary_cross_entropy_against_the_one_hot_label():
    logits = torch.tensor([[2.0, -1.0, 0.5], [-0.3, 0.2, 1.5]])
    labels = torch.tensor([0, 2])
    assert class_loss(logits, labels, "ce") == pytest.approx(F.cross_entropy(logits, labels).item())
    p = torch.sigmoid(logits)
    y = torch.tensor([[1.0, 0, 0], [0, 0, 1.0]])
    by_hand = -(y * p.log() + (1 - y) * (1 - p).log()).mean()
    assert class_loss(logits, labels, "bce_multilabel").item() == pytest.approx(by_hand.item(), rel=1e-6)
    with pytest.raises(ValueError, match="unknown class loss"):
        class_loss(logits, labels, "focal")


def test_f1_at_half_thresholds_each_class_on_its_own():
    probs = torch.tensor([[0.9, 0.6, 0.1],   # label 0: class 0 right, class 1 a false positive
                          [0.2, 0.4, 0.3],   # label 1: no class passes 0.5 (a false negative of 1)
                          [0.1, 0.2, 0.7],   # label 2: right
                          [0.7, 0.1, 0.8]])  # label 2: right, class 0 a false positive
    labels = torch.tensor([0, 1, 2, 2])
    per_class, macro = threshold_f1(probs, labels)
    # class 0: tp 1, fp 1, fn 0 -> 2/3; class 1: tp 0, fp 1, fn 1 -> 0; class 2: tp 2 -> 1
    assert per_class == pytest.approx([2 / 3, 0.0, 1.0])
    assert macro == pytest.approx((2 / 3 + 0 + 1) / 3)
    _, macro_present = threshold_f1(probs[2:], labels[2:])  # only class 2 present: the macro is its F1
    assert macro_present == 1.0
    assert math.isnan(threshold_f1(probs[:0], labels[:0])[1])


def test_collector_takes_sigmoids_and_summary_adds_the_multilabel_metrics():
    logits = torch.tensor([[3.0, -2.0, -2.0], [-1.0, 0.5, 2.0], [-2.0, -2.0, 1.0]])
    batch = {"key": ["a", "b", "c"], "label": torch.tensor([0, 2, 2]), "has_inf": torch.zeros(3, dtype=torch.bool)}
    out = {"lung": None, "inf": None, "cls": logits}
    multi, single = RecordCollector(multilabel=True), RecordCollector()
    multi.add(out, batch)
    single.add(out, batch)
    records: Records = multi.records()
    assert torch.allclose(records.probs, torch.sigmoid(logits))
    assert torch.allclose(single.records().probs, torch.softmax(logits, 1))
    s = summarise(records, CLASS_NAMES, [2], n_boot=20, multilabel=True)
    assert sorted(s["metrics"]) == sorted(metric_names(["cls"], CLASS_NAMES, True))
    assert s["multilabel"] is True
    # b: sigmoid(0.5) > 0.5 for Non-COVID (label 2): a false positive; class 1 has no true image
    assert s["metrics"]["f1_at_0.5/Non-COVID"] == 0.0
    assert s["metrics"]["f1_at_0.5/COVID-19"] == 1.0 and s["metrics"]["f1_at_0.5/Normal"] == 1.0
    assert s["metrics"]["f1_at_0.5_macro"] == 1.0  # over the classes present: Normal and COVID-19
    assert s["metrics"]["auc/Normal"] == 1.0
    lo, hi = s["ci95"]["f1_at_0.5_macro"]
    assert lo <= 1.0 <= hi
    assert "f1_at_0.5_macro" not in summarise(single.records(), CLASS_NAMES, [2])["metrics"]
    s.update(subset="lung", split="test")
    text = classification_tables(s)
    assert "Macro F1 at 0.5" in text and "F1 at 0.5 |" in text

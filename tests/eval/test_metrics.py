"""Metric functions against hand-computed cases and against scikit-learn on random inputs."""

import math

import pytest
import torch

from mtlxray.eval import metrics as M


def _mask(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor(rows, dtype=torch.uint8)[None, None]  # 1×1×H×W


def test_seg_counts_counts_tp_fp_fn_tn_per_image():
    pred = _mask([[1, 1, 0], [0, 1, 0]])
    target = _mask([[1, 0, 0], [1, 1, 0]])
    counts = M.seg_counts(pred, target)
    assert counts.dtype == torch.int64
    assert counts.tolist() == [[2, 1, 1, 2]]


def test_seg_counts_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="shape"):
        M.seg_counts(torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 3))


def test_seg_ratios_match_hand_computation():
    counts = torch.tensor([[2, 1, 1, 2]])  # tp fp fn tn
    assert M.dice(counts).item() == pytest.approx(4 / 6)
    assert M.iou(counts).item() == pytest.approx(2 / 4)
    assert M.pixel_accuracy(counts).item() == pytest.approx(4 / 6)
    assert M.sensitivity(counts).item() == pytest.approx(2 / 3)
    assert M.specificity(counts).item() == pytest.approx(2 / 3)


def test_empty_prediction_on_empty_mask_scores_one():
    empty = _mask([[0, 0], [0, 0]])
    counts = M.seg_counts(empty, empty)
    for fn in (M.dice, M.iou, M.pixel_accuracy, M.sensitivity, M.specificity):
        assert fn(counts).item() == 1.0, fn.__name__


def test_nonempty_prediction_on_empty_mask_scores_zero_dice():
    counts = M.seg_counts(_mask([[1, 0], [0, 0]]), _mask([[0, 0], [0, 0]]))
    assert M.dice(counts).item() == 0.0
    assert M.iou(counts).item() == 0.0
    assert M.sensitivity(counts).item() == 1.0  # nothing to find, nothing missed
    assert M.specificity(counts).item() == pytest.approx(3 / 4)


def test_full_mask_specificity_is_one_by_convention():
    full = _mask([[1, 1], [1, 1]])
    assert M.specificity(M.seg_counts(full, full)).item() == 1.0


def test_seg_summary_gives_mean_over_images_and_global_figures():
    # image 0: perfect on 4 foreground pixels; image 1: 1 tp, 3 fn
    counts = torch.tensor([[4, 0, 0, 0], [1, 0, 3, 0]])
    s = M.seg_summary(counts, "lung_")
    assert s["lung_dice"] == pytest.approx((1.0 + 2 / 5) / 2)
    assert s["lung_dice_global"] == pytest.approx(10 / 13)
    assert s["lung_sensitivity"] == pytest.approx((1 + 0.25) / 2)
    assert s["lung_sensitivity_global"] == pytest.approx(5 / 8)
    assert set(s) == {f"lung_{m}{g}" for m in M.SEG_METRICS for g in ("", "_global")}


def test_seg_summary_of_no_images_is_nan():
    s = M.seg_summary(torch.zeros(0, 4, dtype=torch.long), "inf_")
    assert all(math.isnan(v) for v in s.values())


def test_confusion_matrix_rows_are_truth():
    target = torch.tensor([0, 0, 1, 2, 2, 2])
    pred = torch.tensor([0, 1, 1, 2, 0, 2])
    cm = M.confusion_matrix(pred, target, 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 2]]


def test_confusion_matrix_rejects_out_of_range_labels():
    with pytest.raises(ValueError, match="outside"):
        M.confusion_matrix(torch.tensor([3]), torch.tensor([0]), 3)


def test_classification_summary_matches_hand_computation():
    cm = torch.tensor([[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    s = M.classification_summary(cm, ["A", "B", "C"])
    assert s["accuracy"] == pytest.approx(4 / 6)
    # class A: tp 1, fp 1, fn 1, tn 3
    assert s["precision/A"] == pytest.approx(0.5)
    assert s["recall/A"] == pytest.approx(0.5)
    assert s["specificity/A"] == pytest.approx(3 / 4)
    assert s["f1/A"] == pytest.approx(0.5)
    # class B: tp 1, fp 1, fn 0, tn 4; class C: tp 2, fp 0, fn 1, tn 3
    assert s["precision/B"] == pytest.approx(0.5)
    assert s["recall/C"] == pytest.approx(2 / 3)
    assert s["f1/C"] == pytest.approx(0.8)
    assert s["recall_macro"] == pytest.approx((0.5 + 1 + 2 / 3) / 3)
    assert s["specificity_macro"] == pytest.approx((3 / 4 + 4 / 5 + 1) / 3)


def test_classification_summary_never_predicted_class_has_zero_precision():
    cm = torch.tensor([[2, 0], [1, 0]])  # class 1 never predicted
    s = M.classification_summary(cm, ["a", "b"])
    assert s["precision/b"] == 0.0
    assert s["f1/b"] == 0.0


def test_roc_auc_ovr_matches_hand_computed_value():
    # class 1 positives score 0.35, 0.8 against negatives 0.1, 0.4: 3 of 4 pairs ordered -> 0.75
    p1 = torch.tensor([0.1, 0.4, 0.35, 0.8])
    probs = torch.stack([1 - p1, p1], dim=1)
    labels = torch.tensor([0, 0, 1, 1])
    auc = M.roc_auc_ovr(probs, labels)
    assert auc[1] == pytest.approx(0.75)
    assert auc[0] == pytest.approx(0.75)


def test_roc_auc_ovr_counts_ties_as_half():
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [0.2, 0.8]])
    labels = torch.tensor([0, 1, 1])
    # class 1: positives 0.5, 0.8 vs negative 0.5 -> (0.5 + 1) / 2
    assert M.roc_auc_ovr(probs, labels)[1] == pytest.approx(0.75)


def test_roc_auc_ovr_is_nan_for_absent_class():
    probs = torch.softmax(torch.randn(4, 3), 1)
    auc = M.roc_auc_ovr(probs, torch.tensor([0, 1, 0, 1]))
    assert math.isnan(auc[2]) and not math.isnan(auc[0])


def test_bootstrap_ci_brackets_the_mean_and_is_reproducible():
    values = torch.arange(100, dtype=torch.float64)
    fn = lambda idx: values[idx].mean().item()  # noqa: E731
    lo, hi = M.bootstrap_ci(fn, 100, 400, seed=3)
    assert lo < 49.5 < hi
    # standard error of the mean is ~2.9; a 95% interval is about ±5.7
    assert 3.5 < (hi - lo) / 2 < 8
    assert M.bootstrap_ci(fn, 100, 400, seed=3) == (lo, hi)


def test_bootstrap_ci_of_constant_statistic_is_a_point():
    assert M.bootstrap_ci(lambda idx: 1.0, 10, 50, seed=0) == (1.0, 1.0)


def test_bootstrap_ci_of_no_items_is_nan():
    lo, hi = M.bootstrap_ci(lambda idx: 1.0, 0, 50, seed=0)
    assert math.isnan(lo) and math.isnan(hi)


@pytest.mark.parametrize("seed", range(5))
def test_classification_summary_and_auc_agree_with_scikit_learn(seed):
    from sklearn.metrics import accuracy_score, precision_recall_fscore_support, roc_auc_score

    gen = torch.Generator().manual_seed(seed)
    n, names = 60, ["a", "b", "c", "d"]
    labels = torch.randint(0, 3 if seed % 2 else 4, (n,), generator=gen)  # odd seeds: class d absent
    scores = torch.rand(n, 4, generator=gen) + torch.nn.functional.one_hot(labels, 4) * 0.3
    preds = scores.argmax(1)
    ours = M.classification_summary(M.confusion_matrix(preds, labels, 4), names)
    present = sorted(set(labels.tolist()))
    p, r, f, _ = precision_recall_fscore_support(labels, preds, labels=list(range(4)), zero_division=0)
    for i, c in enumerate(names):
        assert ours[f"precision/{c}"] == pytest.approx(p[i]) and ours[f"recall/{c}"] == pytest.approx(r[i])
        assert ours[f"f1/{c}"] == pytest.approx(f[i])
    mp, mr, mf, _ = precision_recall_fscore_support(labels, preds, labels=present, average="macro", zero_division=0)
    assert (ours["precision_macro"], ours["recall_macro"], ours["f1_macro"]) == pytest.approx((mp, mr, mf))
    assert ours["accuracy"] == pytest.approx(accuracy_score(labels, preds))
    auc = M.roc_auc_ovr(scores.double(), labels)
    for c in present:
        assert auc[c] == pytest.approx(roc_auc_score(labels == c, scores[:, c]))
    assert all(math.isnan(auc[c]) for c in range(4) if c not in present)


@pytest.mark.parametrize("seed", range(3))
def test_dice_and_iou_agree_with_scikit_learn_f1_and_jaccard(seed):
    from sklearn.metrics import f1_score, jaccard_score

    gen = torch.Generator().manual_seed(seed)
    pred, target = torch.rand(4, 1, 16, 16, generator=gen) > 0.5, torch.rand(4, 1, 16, 16, generator=gen) > 0.6
    counts = M.seg_counts(pred, target)
    for i in range(4):
        t, p = target[i].flatten().numpy(), pred[i].flatten().numpy()
        assert M.dice(counts)[i].item() == pytest.approx(f1_score(t, p))
        assert M.iou(counts)[i].item() == pytest.approx(jaccard_score(t, p))

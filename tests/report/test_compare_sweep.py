"""`mtlxray compare --sweep`'s statistics on fixed data: the paired comparison against scipy's Wilcoxon
test and a bootstrap written out by hand, and the within-seed image bootstrap."""

import numpy as np
import pytest
from scipy import stats

from mtlxray.report.sweep import Evaluation, paired_comparison, seed_bootstrap_ci, summarise_point


def _evaluation(point: str, seed: int, dice: dict[str, float]) -> Evaluation:
    keys = list(dice)
    summary = {"metrics": {"n_images": len(keys), "lung_dice": float(np.mean(list(dice.values())))},
               "per_image": {"key": keys, "label": [0] * len(keys), "lung_dice": [dice[k] for k in keys]}}
    return Evaluation(point, seed, "lung", None, summary)


A = {0: {"a": 0.91, "b": 0.85, "c": 0.78, "d": 0.95, "e": 0.60},
     1: {"a": 0.88, "b": 0.90, "c": 0.70, "d": 0.97, "e": 0.66, "f": 0.5}}
B = {0: {"e": 0.55, "d": 0.93, "c": 0.80, "b": 0.79, "a": 0.86},  # another image order
     1: {"a": 0.80, "b": 0.91, "c": 0.61, "d": 0.90, "e": 0.58}}  # no image f: not paired


def test_paired_comparison_equals_scipy_wilcoxon_and_a_hand_bootstrap():
    a = [_evaluation("bf16", s, d) for s, d in A.items()]
    b = [_evaluation("fp32", s, d) for s, d in B.items()]
    result = paired_comparison(a, b, "lung_dice", n_boot=2000, seed=7)

    diffs = np.array([A[s][k] - B[s][k] for s in (0, 1) for k in sorted(B[s])])  # by seed, then image
    rng = np.random.default_rng(7)
    means = diffs[rng.integers(0, len(diffs), size=(2000, len(diffs)))].mean(axis=1)
    assert result.n_pairs == 10 and result.seeds == [0, 1]
    assert result.mean_diff == pytest.approx(diffs.mean())
    assert result.ci95 == pytest.approx(list(np.percentile(means, [2.5, 97.5])))
    assert result.p_wilcoxon == pytest.approx(stats.wilcoxon(diffs).pvalue)
    assert str(result).startswith(f"bf16 − fp32 = {diffs.mean():+.4f} [{result.ci95[0]:+.4f}, "
                                  f"{result.ci95[1]:+.4f}], p = {result.p_wilcoxon:.3g}")


def test_image_bootstrap_resamples_each_seeds_images_and_averages_over_seeds():
    per_seed = [np.array(list(A[0].values())), np.array(list(A[1].values()))]
    rng = np.random.default_rng(0)
    hand = sum(v[rng.integers(0, len(v), size=(500, len(v)))].mean(axis=1) for v in per_seed) / 2
    assert seed_bootstrap_ci(per_seed, 500, seed=0) == pytest.approx(tuple(np.percentile(hand, [2.5, 97.5])))

    point = summarise_point([_evaluation("bf16", s, d) for s, d in A.items()], n_boot=500)
    dice = point.metrics["lung_dice"]
    assert dice.values == pytest.approx([np.mean(list(A[0].values())), np.mean(list(A[1].values()))])
    assert dice.image_ci95 == pytest.approx(list(np.percentile(hand, [2.5, 97.5])))

"""Evaluation summary from per-image records, and end-to-end on tiny shards."""

import json
import math
import os
import sys
from pathlib import Path

import killable
import pytest

from tiny_data import make_tiny_shards
from mtlxray.errors import DataError
from mtlxray.report.evaluate import Case, ImageRecord, _TopK, summarise


def _rec(key, label, pred, lung, inf=(0, 0, 0, 16), has_inf=False):
    probs = [0.1, 0.1, 0.1]
    probs[pred] = 0.8
    return ImageRecord(key, label, probs, list(lung), list(inf), has_inf)


def test_summarise_restricts_infection_metrics_to_covid_images_with_masks():
    records = [
        _rec("a", 0, 0, (4, 0, 0, 12)),
        _rec("b", 1, 1, (2, 2, 2, 10)),
        # COVID-19 with a mask: perfect infection; Non-COVID with has_inf must not count
        _rec("c", 2, 2, (4, 0, 0, 12), inf=(3, 0, 0, 13), has_inf=True),
        _rec("d", 1, 2, (4, 0, 0, 12), inf=(0, 5, 0, 11), has_inf=True),
    ]
    s = summarise(records, n_boot=50)
    assert s["infection"]["n_images"] == 1
    assert s["infection"]["dice"] == 1.0
    assert s["lung"]["n_images"] == 4
    assert s["lung"]["dice"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert s["classification"]["accuracy"] == pytest.approx(3 / 4)
    assert s["confusion"] == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_summarise_gives_cis_around_headline_metrics():
    records = [_rec(f"k{i}", i % 3, i % 3 if i % 4 else (i + 1) % 3, (4, i % 2, 0, 10)) for i in range(30)]
    s = summarise(records, n_boot=200)
    for name, value in (("lung_dice", s["lung"]["dice"]), ("accuracy", s["classification"]["accuracy"]),
                        ("f1_macro", s["classification"]["f1_macro"])):
        lo, hi = s["ci95"][name]
        assert lo <= value <= hi and lo < hi, name
    assert all(math.isnan(v) for v in s["ci95"]["inf_dice"])  # no COVID-19 infection masks here


def test_summarise_perfect_classifier_has_auc_one():
    records = [_rec(f"k{i}", i % 3, i % 3, (1, 0, 0, 1)) for i in range(9)]
    c = summarise(records, n_boot=10)["classification"]
    assert c["auc_macro"] == 1.0 and c["accuracy"] == 1.0


def test_summarise_of_nothing_is_a_data_error():
    with pytest.raises(DataError, match="no images"):
        summarise([], n_boot=10)


# --- end to end on tiny shards with a real (untrained) checkpoint ------------------------------


@pytest.fixture(scope="module")
def shards64(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards"), format="raw", image_size=64)


def test_evaluate_checkpoint_writes_metrics_report_and_figures(tiny_ckpt, shards64, tmp_path):
    from mtlxray.report.evaluate import FIGURES, evaluate_checkpoint

    s = evaluate_checkpoint(tiny_ckpt, shards64, split="test", subset="infection", out=tmp_path, n_boot=20)
    manifest = json.loads((shards64 / "manifest.json").read_text())
    assert s["n_images"] == sum(manifest["counts"]["infection"]["test"].values())
    assert s["infection"]["n_images"] == manifest["counts"]["infection"]["test"]["COVID-19"]
    assert sum(map(sum, s["confusion"])) == s["n_images"]
    saved = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: nan written as null
    assert saved["lung"]["dice"] == pytest.approx(s["lung"]["dice"])
    report = (tmp_path / "report.md").read_text()
    assert "COVID-19 images" in report and "Confusion" in report
    for name in FIGURES.values():
        assert name in report and (tmp_path / name).stat().st_size > 1000


def test_evaluate_phase1_checkpoint_has_no_infection_metrics(tiny_ckpt_phase1, shards64, tmp_path):
    from mtlxray.report.evaluate import evaluate_checkpoint

    s = evaluate_checkpoint(tiny_ckpt_phase1, shards64, split="test", out=tmp_path, n_boot=10)
    assert s["subset"] == "lung"  # the phase-1 default
    assert s["infection"]["n_images"] == 0 and math.isnan(s["infection"]["dice"])


@pytest.mark.distributed
def test_evaluate_two_ranks_gathers_every_image_once(tiny_ckpt, shards64, tmp_path):
    from mtlxray.report.evaluate import evaluate_checkpoint

    single = evaluate_checkpoint(tiny_ckpt, shards64, split="test", subset="lung", out=tmp_path / "one",
                                 n_boot=20)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "MTLXRAY_PG_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    killable.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mtlxray.cli", "evaluate",
                    "--checkpoint", str(tiny_ckpt), "--shards", str(shards64), "--split", "test",
                    "--subset", "lung", "--out", str(tmp_path / "two"), "--bootstrap", "20"],
                 env=env, check=True, timeout=240)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2
    assert two["n_images"] == single["n_images"]
    assert two["confusion"] == single["confusion"]
    assert two["lung"]["dice"] == pytest.approx(single["lung"]["dice"])
    assert two["ci95"]["lung_dice"] == pytest.approx(single["ci95"]["lung_dice"])


def test_top_k_keeps_highest_scores():
    top = _TopK(2)
    for i, score in enumerate([0.3, 0.9, 0.1, 0.5, 0.9]):
        if top.wants(score):
            top.push(score, Case(f"k{i}", score, None, None))
    assert sorted(c.key for c in top.cases()) == ["k1", "k4"]

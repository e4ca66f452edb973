"""mtlxray.eval.records: per-image records and the one summary that validation and `evaluate` share."""

import math

import pytest
import torch

from mtlxray import CLASS_NAMES
from mtlxray.eval.records import RecordCollector, Records, metric_names, summarise

COVID = CLASS_NAMES.index("COVID-19")


def _records(rows) -> Records:
    """rows: (key, label, predicted, lung counts, inf counts, annotated, inf_area, lung_area, inf_any)."""
    probs = torch.full((len(rows), 3), 0.1)
    for i, r in enumerate(rows):
        probs[i, r[2]] = 0.8
    return Records(keys=[r[0] for r in rows], labels=torch.tensor([r[1] for r in rows]),
                   inf_annotated=torch.tensor([r[5] for r in rows]), probs=probs,
                   lung=torch.tensor([r[3] for r in rows]), lung_area=torch.tensor([r[7] for r in rows]),
                   inf=torch.tensor([r[4] for r in rows]), inf_area=torch.tensor([r[6] for r in rows]),
                   inf_any=torch.tensor([r[8] for r in rows]))


ROWS = [
    ("a", 0, 0, (4, 0, 0, 12), (0, 0, 0, 16), False, 0, 4, False),
    ("b", 1, 1, (2, 2, 2, 10), (0, 2, 0, 14), False, 1, 4, True),  # Non-COVID with a false infection
    ("c", 2, 2, (4, 0, 0, 12), (3, 0, 0, 13), True, 3, 4, True),  # COVID-19 with a mask: perfect
    ("d", 1, 2, (4, 0, 0, 12), (0, 5, 0, 11), True, 2, 4, True),  # Non-COVID with has_inf: not scored
]


def test_infection_metrics_cover_covid_images_with_masks_and_false_positives_the_rest():
    m = summarise(_records(ROWS), CLASS_NAMES, [COVID])["metrics"]
    assert m["inf_n"] == 1 and m["inf_dice"] == 1.0
    assert m["lung_n"] == 4 and m["lung_dice"] == pytest.approx((1 + 0.5 + 1 + 1) / 4)
    assert m["inf_negatives_n"] == 3
    assert m["inf_fp_share"] == pytest.approx(2 / 3)  # b and d mark infection, a does not
    assert m["inf_fp_area_pct"] == pytest.approx((0 + 25 + 50) / 3)
    assert m["accuracy"] == pytest.approx(3 / 4)


def test_counts_are_ints_and_positives_without_masks_are_counted():
    import json

    from mtlxray.report.markdown import evaluation_markdown

    unmasked = [(k, COVID, COVID, r[3], (0, 0, 0, 16), False, 0, 4, False) for k, r in zip("xyz", ROWS)]
    s = summarise(_records(ROWS[:2] + unmasked), CLASS_NAMES, [COVID])
    m = s["metrics"]
    assert json.dumps({k: m[k] for k in ("n_images", "lung_n", "inf_n", "inf_negatives_n", "inf_positives_n")}) == \
        '{"n_images": 5, "lung_n": 5, "inf_n": 0, "inf_negatives_n": 2, "inf_positives_n": 3}'
    s.update(subset="infection", split="test", checkpoint="/r/ckpt", shards="/r/shards", world_size=1, bootstrap=0)
    report = evaluation_markdown(s, {}, base="/r/eval")
    assert "(0 of 3 COVID-19 images have an infection mask)" in report  # not "(0 images)"
    assert "Checkpoint `../ckpt`, shards `../shards`" in report


def test_confusion_and_intervals():
    s = summarise(_records(ROWS * 8), CLASS_NAMES, [COVID], n_boot=200)
    assert s["confusion"] == [[8, 0, 0], [0, 8, 8], [0, 0, 8]]
    for name in ("lung_dice", "accuracy", "f1_macro"):
        lo, hi = s["ci95"][name]
        assert lo <= s["metrics"][name] <= hi, name


def test_summary_names_equal_metric_names_for_each_kind_of_model():
    full = summarise(_records(ROWS), CLASS_NAMES, [COVID])["metrics"]
    assert sorted(full) == sorted(metric_names(["lung", "inf", "cls"], CLASS_NAMES))
    phase1 = _records(ROWS)
    phase1.inf = phase1.inf_area = phase1.inf_any = None
    assert sorted(summarise(phase1, CLASS_NAMES, [COVID])["metrics"]) == sorted(metric_names(["lung", "cls"], CLASS_NAMES))
    seg_only = _records(ROWS)
    seg_only.probs = seg_only.inf = seg_only.inf_area = seg_only.inf_any = None
    s = summarise(seg_only, CLASS_NAMES, [COVID])
    assert sorted(s["metrics"]) == sorted(metric_names(["lung"], CLASS_NAMES)) and s["confusion"] is None


def test_a_single_correct_record_has_macro_f1_one_with_a_point_interval():
    s = summarise(_records(ROWS[:1]), CLASS_NAMES, [COVID], n_boot=50)
    assert s["metrics"]["f1_macro"] == 1.0 and s["ci95"]["f1_macro"] == [1.0, 1.0]


def test_collector_records_equal_hand_counts_and_stay_on_device_until_asked():
    out = {"lung": torch.tensor([[[[5.0, -5.0], [-5.0, -5.0]]]]), "inf": torch.tensor([[[[5.0, 5.0], [-5.0, -5.0]]]]),
           "cls": torch.tensor([[0.0, 0.0, 3.0]])}
    batch = {"lung": torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]]), "inf": torch.tensor([[[[1.0, 0.0], [0.0, 0.0]]]]),
             "label": torch.tensor([2]), "has_inf": torch.tensor([True]), "key": ["k"]}
    c = RecordCollector()
    c.add(out, batch)
    c.add(out, {**batch, "key": ["j"]})
    r = c.records()
    assert r.keys == ["k", "j"]
    assert r.lung.tolist() == [[1, 0, 1, 2]] * 2 and r.inf.tolist() == [[1, 1, 0, 2]] * 2
    assert r.lung_area.tolist() == [1, 1] and r.inf_area.tolist() == [1, 1]  # inside the predicted lung
    assert r.unique_by_key().keys == ["j", "k"]
    assert math.isclose(r.probs[0, 2].item(), torch.softmax(out["cls"], 1)[0, 2].item())


_COLLECT_IN_A_CHILD = """
import torch
from pathlib import Path
from mtlxray.eval.records import RecordCollector

def rss_mib():
    status = Path("/proc/self/status").read_text().splitlines()
    return int(next(x for x in status if x.startswith("VmRSS:")).split()[1]) / 1024

collector = RecordCollector()
for i in range(60):  # an evaluation's batches: 16 images at 128², outputs and masks freed after each
    b, s = 16, 128
    out = {"lung": torch.randn(b, 1, s, s), "inf": torch.randn(b, 1, s, s), "cls": torch.randn(b, 3)}
    batch = {"key": [f"{i}_{j}" for j in range(b)], "label": torch.randint(0, 3, (b,)),
             "has_inf": torch.ones(b, dtype=torch.bool), "lung": (torch.rand(b, 1, s, s) > 0.5).float(),
             "inf": (torch.rand(b, 1, s, s) > 0.5).float()}
    collector.add(out, batch)
    if i == 9:
        start = rss_mib()
print(rss_mib() - start, len(collector.records()))
"""


def test_collecting_records_on_the_cpu_does_not_grow_the_process_with_the_batches_it_has_seen():
    import subprocess
    import sys

    # 800 images after the first 160: one batch's freed buffers alone are ~6 MiB. Kept as tiny tensors,
    # the records pinned the heap around them, and the process grew by ~8 MiB a batch.
    proc = subprocess.run([sys.executable, "-c", _COLLECT_IN_A_CHILD], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    growth_mib, images = proc.stdout.split()
    assert int(images) == 960 and float(growth_mib) < 48

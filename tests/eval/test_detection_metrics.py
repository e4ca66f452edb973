"""Box metrics through mtlxray's own path (model output -> RecordCollector -> summarise) against torchmetrics,
the gated figures, and boxes in `evaluate` and `predict`."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from mtlxray import CLASS_NAMES
from mtlxray.eval.records import RecordCollector, metric_names, summarise

# Hand-made predictions: per image (x0, y0, x1, y1, score); within an image no two overlap, so NMS keeps all.
PREDS = [
    [(10, 10, 30, 30, 0.9), (40, 40, 60, 62, 0.6), (2, 50, 8, 60, 0.2)],   # COVID-19: one hit, one near, one miss
    [(5, 5, 25, 20, 0.8)],                                                # COVID-19: a loose hit
    [(30, 30, 50, 50, 0.7), (0, 0, 6, 6, 0.4)],                           # Normal, annotated: false positives
    [(12, 40, 20, 52, 0.3)],                                              # Non-COVID, not annotated: below 0.5
    [(20, 20, 40, 40, 0.55)],                                             # Normal, not annotated: above 0.5
]
GT = [[[10, 10, 30, 30], [40, 40, 60, 60]], [[4, 4, 26, 22], [45, 5, 60, 20]], [], [], []]
LABELS = [2, 2, 0, 1, 0]
ANNOTATED = [True, True, True, False, False]
GATE_P = [0.9, 0.3, 0.7, 0.1, 0.2]  # the gate stops image 1 (a positive) and images 3, 4


def _logit(p: float) -> float:
    return math.log(p / (1 - p))


def _output_and_batch():
    n = max(len(p) for p in PREDS)
    det = torch.zeros(len(PREDS), n, 6)
    det[..., 4:] = -30.0  # padding predictions score ~0
    det[..., :4] = torch.tensor([0.0, 0.0, 1.0, 1.0])
    for i, preds in enumerate(PREDS):
        for j, (*box, score) in enumerate(preds):
            det[i, j, :4] = torch.tensor(box, dtype=torch.float32)
            det[i, j, 4] = det[i, j, 5] = _logit(score)  # quality = objectness: the score is sigmoid(obj)
    batch = {"key": [f"k{i}" for i in range(len(PREDS))], "label": torch.tensor(LABELS),
             "has_inf": torch.tensor(ANNOTATED), "boxes": GT, "img": torch.zeros(len(PREDS), 1, 64, 64)}
    return {"lung": None, "inf": None, "cls": None, "det": det, "det_points": None}, batch


def _torchmetrics_map(keep) -> dict:
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="faster_coco_eval")
    preds, targets = [], []
    for i in range(len(PREDS)):
        if not ANNOTATED[i]:
            continue
        rows = [p for p in PREDS[i] if keep[i]]
        preds.append({"boxes": torch.tensor([r[:4] for r in rows], dtype=torch.float32).reshape(-1, 4),
                      "scores": torch.tensor([r[4] for r in rows], dtype=torch.float32),
                      "labels": torch.zeros(len(rows), dtype=torch.long)})
        targets.append({"boxes": torch.tensor(GT[i], dtype=torch.float32).reshape(-1, 4),
                        "labels": torch.zeros(len(GT[i]), dtype=torch.long)})
    metric.update(preds, targets)
    return {k: float(v) for k, v in metric.compute().items() if k in ("map", "map_50")}


def test_map_matches_torchmetrics_on_hand_made_boxes_through_the_record_path():
    from mtlxray.eval.detection_metrics import map_backend

    out, batch = _output_and_batch()
    collector = RecordCollector()
    collector.add(out, batch, gate=torch.tensor(GATE_P))
    records = collector.records()
    summary = summarise(records, CLASS_NAMES, [2], gate_threshold=0.5, det_score_threshold=0.5, det_nms_iou=0.5,
                        det_max_boxes=10)
    m = summary["metrics"]
    assert map_backend() == "faster_coco_eval"
    ungated = _torchmetrics_map([True] * len(PREDS))
    assert 0 < ungated["map"] < ungated["map_50"] < 1
    assert m["det_map"] == pytest.approx(ungated["map"], abs=1e-6)
    assert m["det_map_50"] == pytest.approx(ungated["map_50"], abs=1e-6)
    gated = _torchmetrics_map([p >= 0.5 for p in GATE_P])
    assert m["det_map_gated"] == pytest.approx(gated["map"], abs=1e-6)
    assert m["det_map_50_gated"] == pytest.approx(gated["map_50"], abs=1e-6)
    assert m["det_map_gated"] < m["det_map"]  # the gate stopped a positive with a hit
    # Negatives (labels 0, 1): images 2 (0.7), 3 (0.3 < 0.5), 4 (0.55) -> 2 of 3 have a reported box;
    # gated, only image 2 passes.
    assert m["det_fp_share"] == pytest.approx(2 / 3) and m["det_fp_share_gated"] == pytest.approx(1 / 3)
    assert m["det_n"] == 3 and m["det_negatives_n"] == 3
    assert m["gate_sensitivity"] == pytest.approx(0.5) and m["gate_specificity"] == pytest.approx(2 / 3)
    assert [len(b) for b in summary["per_image"]["det_boxes"]] == [2, 1, 1, 0, 1]
    assert set(metric_names(["det"], CLASS_NAMES, gated=True)) == set(m)


def test_gated_infection_dice_counts_a_stopped_positive_as_an_empty_mask():
    from mtlxray.eval.records import Records

    # tp, fp, fn, tn per image: a positive found well, a positive the gate stops, a negative with a false positive.
    counts = torch.tensor([[90, 10, 10, 890], [50, 0, 50, 900], [0, 20, 0, 980]])
    records = Records(keys=["a", "b", "c"], labels=torch.tensor([2, 2, 0]), inf_annotated=torch.ones(3, dtype=torch.bool),
                      inf=counts, inf_area=torch.tensor([100, 50, 20]), inf_any=torch.tensor([True, True, True]),
                      gate=torch.tensor([0.8, 0.2, 0.6]))
    m = summarise(records, CLASS_NAMES, [2], gate_threshold=0.5)["metrics"]
    dice = [2 * 90 / (180 + 20), 2 * 50 / (100 + 50)]
    assert m["inf_dice"] == pytest.approx(sum(dice) / 2)
    assert m["inf_dice_gated"] == pytest.approx(dice[0] / 2)  # image b: no prediction, Dice 0
    assert m["inf_fp_share"] == 1.0 and m["inf_fp_share_gated"] == 1.0  # the negative passes the gate
    records.gate = torch.tensor([0.8, 0.2, 0.4])
    assert summarise(records, CLASS_NAMES, [2], gate_threshold=0.5)["metrics"]["inf_fp_share_gated"] == 0.0


# -------------------------------------------------------------------------------------------------
# evaluate and predict


TINY = ["model.img_size=64", "model.embed_dim=12", "model.depths=[1,1]", "model.num_heads=[1,2]",
        "model.window_size=4", "model.ppm_channels=16", "model.ppm_bins=[1,2]", "model.decoder_channels=[16,8]",
        "model.cross_attn_heads=[1,1]", "model.head_channels=8", "model.cls_channels=8", "data.workers=0",
        "model.det_head=fcos", "model.det_score_threshold=0.0", "phase.name=phase2", "phase.frozen=[]",
        "phase.loss_weights={lung: 1.0, inf: 1.0, cls: 0.3, det: 1.0}",
        "phase.teacher_forcing={gate: cls_head, p: 0.9, threshold: 0.5}"]


@pytest.fixture(scope="module")
def det_ckpt(tmp_path_factory) -> Path:
    """A randomly initialised phase-2 Swin-UNet with an FCOS head and a class-head gate, as the trainer saves it."""
    from mtlxray.checkpoint import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, TrainState
    from mtlxray.config import dump_config, load_config
    from mtlxray.model import build_model

    cfg = load_config(None, TINY)
    torch.manual_seed(0)
    model = build_model(cfg.model)
    ckpt = tmp_path_factory.mktemp("det-ckpt") / "checkpoints" / "best"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / WEIGHTS_NAME))
    (ckpt / CONFIG_NAME).write_text(dump_config(cfg))
    (ckpt / STATE_NAME).write_text(TrainState(phase="phase2").to_json())
    return ckpt


@pytest.fixture(scope="module")
def shards64(tmp_path_factory):
    from tiny_data import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("shards"), format="raw", image_size=64)


def test_evaluate_reports_boxes_and_the_gate_with_and_without_it(det_ckpt, shards64, tmp_path):
    from mtlxray.report.evaluate import evaluate_checkpoint, headline

    s = evaluate_checkpoint(det_ckpt, shards64, split="test", subset="infection", out=tmp_path, n_boot=0,
                            allow_leakage=True)  # its config names training shards that do not exist
    m = s["metrics"]
    for name in ("det_map", "det_map_50", "det_fp_share", "det_map_gated", "det_fp_share_gated", "inf_dice",
                 "inf_dice_gated", "inf_fp_share_gated", "gate_sensitivity", "gate_specificity"):
        assert name in m, name
    assert m["det_n"] == m["n_images"]  # every infection-subset image is annotated
    assert s["gate"].startswith("P(classes [2]) >= 0.5 under the class head")
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert all(isinstance(json.loads(r["boxes"]), list) and 0 <= float(r["gate_p"]) <= 1 for r in rows)
    assert "Infection boxes and the gate" in (tmp_path / "report.md").read_text()
    assert "gated:" in headline(s) and "mAP@0.5" in headline(s)
    off = evaluate_checkpoint(det_ckpt, shards64, split="test", subset="infection", out=tmp_path / "off", n_boot=0,
                              gate={"source": "none"}, allow_leakage=True)
    assert "det_map" in off["metrics"] and "det_map_gated" not in off["metrics"] and off["gate"] is None
    assert off["metrics"]["det_map"] == m["det_map"]


def test_predict_writes_boxes_gated_and_ungated_to_json_csv_and_the_overlay(det_ckpt, tmp_path):
    from PIL import Image

    from mtlxray.eval.gate import Gate
    from mtlxray.report import predict as P

    model, cfg = P.load_predictor(det_ckpt)
    image = (np.random.default_rng(0).random((80, 96)) * 255).astype(np.uint8)
    Image.fromarray(image).save(tmp_path / "a.png")
    (rec,), _ = P.predict_files(model, cfg.model.img_size, [tmp_path / "a.png"], tmp_path / "o",
                                gating=Gate("cls_head", [2], 0.0))
    assert rec["gate_passed"] is True and rec["boxes"] == rec["boxes_ungated"] and rec["boxes"]
    x0, y0, x1, y1, score = rec["boxes"][0]
    assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 80 and 0 <= score <= 1  # at the original size
    (stopped,), _ = P.predict_files(model, cfg.model.img_size, [tmp_path / "a.png"], tmp_path / "g",
                                    gating=Gate("cls_head", [2], 1.0))
    assert stopped["gate_passed"] is False and stopped["boxes"] == [] and stopped["boxes_ungated"] == rec["boxes"]
    P.write_predictions(tmp_path / "o", [rec])
    row = next(csv.DictReader((tmp_path / "o" / "predictions.csv").open()))
    assert json.loads(row["boxes"]) == rec["boxes"]
    overlay = np.asarray(Image.open(tmp_path / "o" / "overlays" / "a_overlay.png"))[:80]
    grey = np.asarray(Image.open(tmp_path / "g" / "overlays" / "a_overlay.png"))[:80]
    assert (overlay == P.BOX_RGB).all(-1).any() and not (grey == P.BOX_RGB).all(-1).any()
    assert (grey == P.STOPPED_BOX_RGB).all(-1).any()

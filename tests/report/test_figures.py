"""Figures render from synthetic arrays into readable PNGs."""

import json

import numpy as np
import pytest
from PIL import Image

from mtlxray.report import figures as F


def _png_size(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_overlay_rgb_colours_lung_and_infection_and_keeps_background():
    img = np.full((4, 4), 100, np.uint8)
    lung = np.zeros((4, 4), bool)
    lung[:2] = True
    inf = np.zeros((4, 4), bool)
    inf[0, 0] = True
    rgb = F.overlay_rgb(img, lung, inf)
    assert rgb.shape == (4, 4, 3) and rgb.dtype == np.uint8
    assert (rgb[3, 3] == 100).all()  # untouched background stays gray
    lung_px, inf_px = rgb[1, 1].astype(int), rgb[0, 0].astype(int)
    assert lung_px[2] > lung_px[0]  # lung tinted blue
    assert inf_px[0] > inf_px[2]  # infection tinted red


def test_read_metrics_jsonl_skips_torn_last_line(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "tra')
    assert F.read_metrics_jsonl(p) == [{"step": 1, "train/loss": 1.0}]


def test_plot_loss_curves_draws_train_and_val_series_per_phase(tmp_path):
    paths = {}
    for phase in ("phase 1", "phase 2"):
        p = tmp_path / f"{phase}.jsonl"
        rows = [{"type": "train", "step": s, "loss": 1 / s, "loss/lung": 0.5 / s} for s in range(1, 20)]
        rows += [{"type": "eval", "step": s, "val/loss": 1.2 / s, "val/loss/lung": 0.6 / s, "val/lung_dice": 0.9}
                 for s in (5, 10, 15)]
        p.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths[phase] = p
    series = F._loss_series(F.read_metrics_jsonl(paths["phase 1"]))
    assert set(series) == {("train", "loss"), ("train", "loss/lung"), ("val", "loss"), ("val", "loss/lung")}
    assert series["val", "loss/lung"][0] == [5, 10, 15]
    out = F.plot_loss_curves(paths, tmp_path / "loss.png")
    w, h = _png_size(out)
    assert w > 2 * h * 0.9  # two panels side by side


def test_plot_confusion_and_histograms_and_overlays_write_pngs(tmp_path):
    F.plot_confusion(np.array([[5, 1, 0], [0, 4, 2], [1, 0, 6]]), ["Normal", "Non-COVID", "COVID-19"],
                     tmp_path / "cm.png")
    F.plot_dice_histograms({"lung": np.random.default_rng(0).uniform(0.8, 1, 50),
                            "infection": np.array([])}, tmp_path / "hist.png")
    img = np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8)
    m = np.zeros((32, 32), bool)
    m[8:24, 4:14] = True
    cases = [F.OverlayCase(f"case {i}", img, m, m & (np.arange(32) < 12), m, m) for i in range(2)]
    F.plot_overlay_grid(cases, tmp_path / "ov.png", "cases")
    for name in ("cm.png", "hist.png", "ov.png"):
        assert _png_size(tmp_path / name)[0] > 200
    assert not list(tmp_path.glob(".*"))  # no temp files left behind


@pytest.mark.parametrize("n", [0, 1])
def test_plot_overlay_grid_handles_few_cases(tmp_path, n):
    img = np.zeros((16, 16), np.uint8)
    m = np.zeros((16, 16), bool)
    cases = [F.OverlayCase("only", img, m, m, m, m)][:n]
    assert _png_size(F.plot_overlay_grid(cases, tmp_path / "ov.png"))[1] > 100

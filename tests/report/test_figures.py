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


# --- error overlays, annotation, ranking, file modes ---------------------------------------------


def _rgb255(colour):
    return np.round(np.array(colour) * 255).astype(np.uint8)


def test_error_rgb_colours_false_positives_and_negatives_apart():
    img = np.zeros((2, 3), np.uint8)
    true = np.array([[1, 1, 0], [0, 0, 0]], bool)
    pred = np.array([[1, 0, 1], [0, 0, 0]], bool)
    rgb = F.error_rgb(img, true, pred).astype(int)
    tp, fn, fp, bg = rgb[0, 0], rgb[0, 1], rgb[0, 2], rgb[1, 0]
    assert (bg == 0).all()
    assert fp[0] > 150 and fp[2] > 150 and fp[1] < 60  # magenta
    assert fn[0] > 150 and fn[1] > 150 and fn[2] < 60  # yellow
    assert tp[1] > tp[0] and tp[1] > tp[2] and tp.max() < fp.max()  # faint green
    assert len({tuple(tp), tuple(fn), tuple(fp)}) == 3


def test_annotate_rgb_keeps_the_image_grid_and_adds_text_and_legend_below():
    rgb = np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8)
    out = F.annotate_rgb(rgb, ["COVID-19 (p=0.912)", "severity 12.1%"], [("lung", F.LUNG_RGB), ("infection", F.INF_RGB)])
    assert out.shape[1] == 60 and out.shape[0] > 40 and out.dtype == np.uint8
    assert np.array_equal(out[:40], rgb)
    band = out[40:].reshape(-1, 3)
    for colour in (F.LUNG_RGB, F.INF_RGB):
        assert (band == _rgb255(colour)).all(1).any()
    assert (band.min(1) > 200).any()  # white text


def test_prediction_overlay_without_infection_has_no_infection_swatch():
    img = np.full((64, 64), 90, np.uint8)
    lung = np.zeros((64, 64), bool)
    lung[10:50, 8:30] = True
    out = F.prediction_overlay(img, lung, None, predicted_class="Normal", probability=0.7, severity=None,
                               note="no infection output (phase-1 model)")
    band = out[64:].reshape(-1, 3)
    assert (band == _rgb255(F.LUNG_RGB)).all(1).any()
    assert not (band == _rgb255(F.INF_RGB)).all(1).any()


def test_rank_cases_orders_by_score_worst_first_with_missing_scores_last():
    img = np.zeros((4, 4), np.uint8)
    m = np.zeros((4, 4), bool)
    cases = [F.OverlayCase(str(s), img, m, m, m, m, score=s) for s in (0.9, None, 0.1, float("nan"), 0.5)]
    assert [c.title for c in F.rank_cases(cases)][:3] == ["0.1", "0.5", "0.9"]
    assert [c.title for c in F.rank_cases(cases, worst_first=False, n=2)] == ["0.9", "0.5"]


def test_overlay_grid_has_error_columns_and_scores(tmp_path, monkeypatch):
    img = np.random.default_rng(1).integers(0, 255, (32, 32), dtype=np.uint8)
    m = np.zeros((32, 32), bool)
    m[8:24, 4:14] = True
    shown = []
    real_imshow = F.plt.Axes.imshow

    def imshow(ax, rgb, *a, **k):
        shown.append(np.asarray(rgb))
        return real_imshow(ax, rgb, *a, **k)

    monkeypatch.setattr(F.plt.Axes, "imshow", imshow)
    case = F.OverlayCase("worst", img, m, m, np.roll(m, 3, axis=1), np.zeros_like(m), score=0.41,
                         score_name="infection Dice")
    F.plot_overlay_grid([case], tmp_path / "ov.png", "worst cases by infection Dice")
    assert len(shown) == 5  # image, truth, prediction, lung errors, infection errors
    lung_err, inf_err = shown[3], shown[4]
    assert np.array_equal(lung_err, F.error_rgb(img, m, np.roll(m, 3, axis=1)))
    assert np.array_equal(inf_err, F.error_rgb(img, m, np.zeros_like(m)))  # all missed: false negatives
    shown.clear()
    phase1 = F.OverlayCase("p1", img, m, None, m, None)
    F.plot_overlay_grid([phase1], tmp_path / "p1.png")
    assert len(shown) == 4  # no infection column without infection masks


def test_figures_keep_the_umask_mode(tmp_path):
    import os

    old = os.umask(0o022)
    try:
        F.plot_confusion(np.eye(3, dtype=int), ["a", "b", "c"], tmp_path / "cm.png")
        F.save_png(np.zeros((4, 4, 3), np.uint8), tmp_path / "x.png")
    finally:
        os.umask(old)
    assert {oct(p.stat().st_mode & 0o777) for p in tmp_path.iterdir()} == {"0o644"}


def test_prediction_overlay_draws_the_infection_severity_counts_and_names_the_rest(tmp_path):
    img = np.full((64, 64), 90, np.uint8)
    lung = np.zeros((64, 64), bool)
    lung[10:50, 8:30] = True
    inf = np.zeros((64, 64), bool)
    inf[20:30, 20:40] = True  # half inside the lung, half outside
    out = F.prediction_overlay(img, lung, inf, predicted_class="COVID-19", probability=0.9, severity=12.5)
    inside, outside = out[25, 25].astype(int), out[25, 35].astype(int)
    assert np.array_equal(out[25, 25], F.overlay_rgb(img, lung, inf)[25, 25])  # counted: full infection colour
    assert inside[0] - inside[2] > 2 * abs(outside[0] - outside[2])  # outside the lung: faint, not red
    band = out[64:].reshape(-1, 3)
    assert (band == _rgb255(F.OUTSIDE_RGB)).all(1).any()  # and in the legend as not counted


def test_figures_for_a_paper_loss_scale_colours_histograms_and_small_overlays(tmp_path, monkeypatch):
    figs = []
    real_save = F._save

    def save(fig, out, **kw):
        figs.append(fig)
        return real_save(fig, out, **kw)

    monkeypatch.setattr(F, "_save", save)
    paths = {}
    for phase, tasks in (("phase 1", ["lung"]), ("phase 2", ["inf", "lung"])):
        rows = [{"type": "train", "step": s, "loss": (50.0 if s == 1 else 1 / s),
                 **{f"loss/{t}": 0.5 / s for t in tasks}} for s in range(1, 20)]
        paths[phase] = tmp_path / f"{phase}.jsonl"
        paths[phase].write_text("".join(json.dumps(r) + "\n" for r in rows))
    F.plot_loss_curves(paths, tmp_path / "loss.png")
    ax1, ax2 = figs[-1].axes
    assert ax1.get_yscale() == "log"  # the early spike would squash the curves
    colour = {ax: {line.get_label(): line.get_color() for line in ax.lines} for ax in (ax1, ax2)}
    assert colour[ax1]["train lung"] == colour[ax2]["train lung"]  # one colour per task in every panel
    F.plot_dice_histograms({"lung": np.array([0.9, 0.95, 0.97]), "infection": np.array([])}, tmp_path / "h.png")
    (hist,) = figs[-1].axes  # no empty n=0 panel
    assert all(float(t).is_integer() for t in hist.get_yticks())
    yy, xx = np.mgrid[0:256, 0:256]
    img = (127 + 60 * np.sin(xx / 17.0) * np.cos(yy / 23.0) + yy / 8).astype(np.uint8)  # smooth, like an X-ray
    m = np.zeros((256, 256), bool)
    m[40:200, 30:120] = True
    cases = [F.OverlayCase(f"case {i}", img, m, m, np.roll(m, i, 1), m) for i in range(6)]
    F.plot_overlay_grid(cases, tmp_path / "ov.png", "best and worst")
    with Image.open(tmp_path / "ov.png") as im:
        assert im.mode == "P"  # a palette PNG
        rgb = np.asarray(im.convert("RGB")).reshape(-1, 3)
    assert (tmp_path / "ov.png").stat().st_size < 250_000  # 673 kB as the RGBA PNG it was
    assert (rgb == _rgb255(F.FP_RGB)).all(1).any()  # the legend's colours survive the palette

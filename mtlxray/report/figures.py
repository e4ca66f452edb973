"""PNG figures: loss curves per phase, confusion matrix, mask and error overlays, Dice histograms,
and the annotated overlay `predict` writes per image.

Everything renders with matplotlib's Agg backend (no display needed) or PIL, and is written
atomically through `mtlxray.io` (files get the mode the umask gives, like any other file).
"""

from __future__ import annotations

import io
import json
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from mtlxray.io import atomic_path  # noqa: E402
from mtlxray.overlays import INF_RGB, LUNG_RGB, MASK_ALPHA, blend, gray_rgb, overlay_rgb  # noqa: E402

logger = logging.getLogger(__name__)

OUTSIDE_RGB = (0.55, 0.35, 0.3)
"""Predicted infection outside the predicted lung, in predict's overlay (muted brown)."""
TP_RGB = (0.2, 0.75, 0.3)
"""Error overlays: predicted and true (green, faint)."""
FP_RGB = (1.0, 0.1, 0.85)
"""Error overlays: predicted but not true, a false positive (magenta)."""
FN_RGB = (1.0, 0.85, 0.0)
"""Error overlays: true but missed, a false negative (yellow); magenta and yellow stay apart under
the common colour-vision deficiencies and against grey."""
_ERROR_ALPHA = {"tp": 0.25, "fp": 0.8, "fn": 0.8}


@dataclass(frozen=True)
class OverlayCase:
    """One row of an overlay grid: the image, its true and predicted masks (H×W each; infection
    None where there is none, e.g. a phase-1 model), and optionally the score it was ranked by."""

    title: str
    image: np.ndarray
    lung_true: np.ndarray
    inf_true: Optional[np.ndarray]
    lung_pred: np.ndarray
    inf_pred: Optional[np.ndarray]
    score: Optional[float] = None
    """Shown under the title as `score_name score` (e.g. infection Dice 0.412)."""
    score_name: str = "Dice"


def rank_cases(cases: Sequence[OverlayCase], n: Optional[int] = None,
               worst_first: bool = True) -> list[OverlayCase]:
    """Cases ordered by `score` (worst first by default; cases without a finite score last),
    the first `n` of them if given: e.g. a phase-2 report's worst cases by infection Dice."""
    def key(c: OverlayCase) -> tuple[bool, float]:
        ok = c.score is not None and math.isfinite(c.score)
        return (not ok, (c.score if worst_first else -c.score) if ok else 0.0)

    ranked = sorted(cases, key=key)
    return ranked if n is None else ranked[:n]


def _save(fig: plt.Figure, out: Path, *, palette: int = 0, dpi: int = 110) -> Path:
    """Write the figure to `out` atomically, then close it. `palette`: a palette PNG of that many
    colours (PIL's fast octree quantiser, which keeps small patches of a legend colour that median cut
    merged away; no dithering, which defeats the compression): a six-case overlay grid at 90 dpi and
    256 colours took 111 kB against 673 kB as RGBA."""
    out = Path(out)
    try:
        with atomic_path(out) as tmp:
            if palette:
                buf = io.BytesIO()
                fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
                buf.seek(0)
                with Image.open(buf) as im:
                    im.convert("RGB").quantize(palette, method=Image.Quantize.FASTOCTREE,
                                               dither=Image.Dither.NONE).save(tmp, format="PNG", optimize=True)
            else:
                fig.savefig(tmp, format="png", dpi=dpi, bbox_inches="tight")
    finally:
        plt.close(fig)
    logger.debug("wrote %s", out)
    return out


def save_png(array: np.ndarray, out: Path) -> Path:
    """Write an H×W or H×W×3 uint8 array as a PNG atomically."""
    out = Path(out)
    with atomic_path(out) as tmp:
        Image.fromarray(array).save(tmp, format="PNG")
    return out


def error_rgb(image: np.ndarray, true: np.ndarray, pred: np.ndarray) -> np.ndarray:
    """Segmentation errors on a grayscale image: false positives (predicted, not true) in FP_RGB,
    false negatives (true, missed) in FN_RGB, true positives faint in TP_RGB. H×W×3 uint8."""
    t, p = np.asarray(true).astype(bool), np.asarray(pred).astype(bool)
    return blend(gray_rgb(image), ((t & p, TP_RGB, _ERROR_ALPHA["tp"]), (p & ~t, FP_RGB, _ERROR_ALPHA["fp"]),
                                    (t & ~p, FN_RGB, _ERROR_ALPHA["fn"])))


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: the fixed bitmap font
        return ImageFont.load_default()


def _wrap(draw: ImageDraw.ImageDraw, text: str, font, width: int) -> list[str]:
    """`text` broken at spaces into lines no wider than `width` pixels (a longer word stands alone)."""
    lines: list[str] = []
    for word in text.split(" "):
        if lines and draw.textlength(f"{lines[-1]} {word}", font=font) <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def annotate_rgb(rgb: np.ndarray, lines: Sequence[str],
                 legend: Sequence[tuple[str, tuple[float, float, float]]]) -> np.ndarray:
    """`rgb` (H×W×3 uint8) with a dark band below it holding `lines` of text and a colour legend.

    The image keeps its pixel grid (the band is added under row H-1), so pixel (x, y) of the
    result is pixel (x, y) of the input; text wraps to the image width.
    """
    h, w = rgb.shape[:2]
    size = max(10, min(28, w // 32))
    font = _font(size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    pad, line_h = max(2, size // 3), size + max(2, size // 4)
    text_lines = [part for line in lines for part in _wrap(probe, line, font, w - 2 * pad)]
    items = [(label, tuple(int(round(255 * c)) for c in colour)) for label, colour in legend]
    rows: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    x = pad
    for label, colour in items:  # legend entries: a swatch and its label, wrapped like text
        item_w = size + pad + int(probe.textlength(label, font=font)) + 2 * pad
        if rows[-1] and x + item_w > w - pad:
            rows.append([])
            x = pad
        rows[-1].append((label, colour))
        x += item_w
    n_rows = len(text_lines) + (len(rows) if items else 0)
    band = Image.new("RGB", (w, n_rows * line_h + 2 * pad), (24, 24, 24))
    draw = ImageDraw.Draw(band)
    y = pad
    for line in text_lines:
        draw.text((pad, y), line, fill=(255, 255, 255), font=font)
        y += line_h
    for row in rows if items else []:
        x = pad
        for label, colour in row:
            draw.rectangle((x, y + 1, x + size - 1, y + size), fill=colour)
            x += size + pad
            draw.text((x, y), label, fill=(230, 230, 230), font=font)
            x += int(draw.textlength(label, font=font)) + 2 * pad
        y += line_h
    return np.concatenate([rgb, np.asarray(band, np.uint8)], axis=0)


def prediction_overlay(image: np.ndarray, lung: np.ndarray, inf: Optional[np.ndarray], *, predicted_class: str,
                       probability: float, severity: Optional[float], note: str = "") -> np.ndarray:
    """The overlay `predict` writes: lung and infection on the image, and a band below it with the
    predicted class and its probability, the severity, and a legend. H'×W×3 uint8, H' > H.

    severity: infected lung area in percent, or None (then `note` says why, e.g. gated).
    """
    sev = f"severity {severity:.1f}%" if severity is not None else f"severity n/a{f' ({note})' if note else ''}"
    lines = [f"{predicted_class} (p={probability:.3f})", sev]
    legend = [("lung", LUNG_RGB)]
    if inf is None:
        return annotate_rgb(overlay_rgb(image, lung, None), lines, legend)
    # Severity counts infection inside the lung only: that is drawn in full; infection outside the
    # lung is drawn faint and named as not counted.
    lung, inf = np.asarray(lung).astype(bool), np.asarray(inf).astype(bool)
    outside = inf & ~lung
    legend.append(("infection (in lung: counted)", INF_RGB))
    if outside.any():
        legend.append(("outside lung: not counted", OUTSIDE_RGB))
    rgb = blend(gray_rgb(image), ((lung, LUNG_RGB, MASK_ALPHA["lung"]), (inf & lung, INF_RGB, MASK_ALPHA["inf"]),
                                   (outside, OUTSIDE_RGB, MASK_ALPHA["outside"])))
    return annotate_rgb(rgb, lines, legend)


def read_metrics_jsonl(path: Path) -> list[dict]:
    """Records of a metrics.jsonl file; a torn last line (a run killed mid-write) is skipped."""
    records = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            logger.warning("%s: skipping a line that is not JSON", path)
    return records


def _loss_series(records: Sequence[dict]) -> dict[tuple[str, str], tuple[list[float], list[float]]]:
    """(kind, task) -> (steps, values) for the loss keys of metrics.jsonl records.

    Training lines carry `loss` and `loss/<task>`, evaluation lines `val/loss` and `val/loss/<task>`.
    """
    series: dict[tuple[str, str], tuple[list[float], list[float]]] = {}
    for r in records:
        if "step" not in r:
            continue
        for key, v in r.items():
            if key.startswith("val/loss"):
                kind, task = "val", key[len("val/"):]
            elif key == "loss" or key.startswith("loss/"):
                kind, task = "train", key
            else:
                continue
            if isinstance(v, (int, float)) and np.isfinite(v):
                xs, ys = series.setdefault((kind, task), ([], []))
                xs.append(r["step"])
                ys.append(v)
    return series


def plot_loss_curves(phases: Mapping[str, Path], out: Path) -> Path:
    """Training and validation loss against step, one panel per phase (the paper's Fig. 2 and 3).

    phases: phase title -> metrics.jsonl. The weighted total and each task's loss are drawn, training
    solid and validation dashed with markers, one colour per loss.
    """
    every = {title: _loss_series(read_metrics_jsonl(path)) for title, path in phases.items()}
    # one colour per loss across every panel
    tasks = sorted({task for series in every.values() for _, task in series}, key=lambda t: (t != "loss", t))
    colours = {task: f"C{i}" for i, task in enumerate(tasks)}
    fig, axes = plt.subplots(1, len(phases), figsize=(6.0 * len(phases), 4.6), squeeze=False)
    for ax, (title, series) in zip(axes[0], every.items()):
        for task in tasks:
            name = "total" if task == "loss" else task.split("/", 1)[1]
            if ("train", task) in series:
                ax.plot(*series["train", task], color=colours[task], lw=1.3, alpha=0.85, label=f"train {name}")
            if ("val", task) in series:
                ax.plot(*series["val", task], color=colours[task], lw=1.6, ls="--", marker="o", ms=4,
                        label=f"val {name}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        values = np.concatenate([np.asarray(v, np.float64) for _, v in series.values()]) if series else np.array([])
        scale = _robust_scale(values)
        if scale == "log":
            ax.set_yscale("log")
            ax.set_ylabel("loss (log scale: early values span decades)")
        if ax.lines:
            # below the axes: a legend inside covers the curves
            ax.legend(fontsize=8, ncol=3, loc="upper center", bbox_to_anchor=(0.5, -0.16), frameon=False)
        else:
            ax.text(0.5, 0.5, "no loss records", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Training (solid) and validation (dashed) loss")
    fig.tight_layout()
    return _save(fig, out)


def _robust_scale(values: np.ndarray) -> str:
    """`log` when a few early spikes would squash the curves (the largest value over 10× the median
    of positive values), else `linear`."""
    positive = values[np.isfinite(values) & (values > 0)]
    if positive.size < 3 or positive.size != values[np.isfinite(values)].size:
        return "linear"
    return "log" if positive.max() > 10 * float(np.median(positive)) else "linear"


def plot_confusion(confusion: np.ndarray, class_names: Sequence[str], out: Path,
                   title: str = "Confusion matrix") -> Path:
    """Confusion matrix with counts and row percentages; rows are the true class."""
    cm = np.asarray(confusion, dtype=np.int64)
    rows = cm.sum(1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape, np.float64), where=rows > 0)
    fig, ax = plt.subplots(figsize=(1.6 * len(class_names) + 2.0, 1.4 * len(class_names) + 1.4))
    im = ax.imshow(frac, cmap="Blues", vmin=0, vmax=1)
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{cm[i, j]}\n{100 * frac[i, j]:.0f}%", ha="center", va="center",
                    color="white" if frac[i, j] > 0.6 else "black", fontsize=10)
    ax.set_xticks(range(len(class_names)), class_names)
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="fraction of true class")
    fig.tight_layout()
    return _save(fig, out)


ERROR_LEGEND = [Patch(color=FP_RGB, label="false positive"), Patch(color=FN_RGB, label="false negative"),
                Patch(color=TP_RGB, alpha=0.6, label="true positive")]


def plot_overlay_grid(cases: Sequence[OverlayCase], out: Path, title: str = "", *, errors: bool = True) -> Path:
    """One row per case, in the order given: the image, the ground truth and the prediction
    overlays, then (with `errors`) the lung errors and, where any case has infection masks, the
    infection errors: false positives in FP_RGB, false negatives in FN_RGB. Each row is labelled
    with the case's title and its score (see `rank_cases` to order them)."""
    has_inf = any(c.inf_true is not None or c.inf_pred is not None for c in cases)
    names = ["image", "ground truth", "prediction"]
    if errors:
        names += ["lung errors"] + (["infection errors"] if has_inf else [])
    n = max(len(cases), 1)
    fig, axes = plt.subplots(n, len(names), figsize=(3.0 * len(names), 3.1 * n), squeeze=False)
    for row, case in zip(axes, cases):
        panels = [
            np.repeat(case.image[..., None], 3, -1) if case.image.ndim == 2 else case.image,
            overlay_rgb(case.image, case.lung_true, case.inf_true),
            overlay_rgb(case.image, case.lung_pred, case.inf_pred),
        ]
        if errors:
            panels.append(error_rgb(case.image, case.lung_true, case.lung_pred))
            if has_inf:
                zeros = np.zeros(case.image.shape[:2], bool)
                panels.append(error_rgb(case.image, zeros if case.inf_true is None else case.inf_true,
                                        zeros if case.inf_pred is None else case.inf_pred))
        for ax, name, rgb in zip(row, names, panels):
            ax.imshow(rgb, cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=9)
        label = case.title if case.score is None else f"{case.title}\n{case.score_name} {case.score:.3f}"
        row[0].set_ylabel(label, fontsize=10)
    if not cases:
        for ax in axes[0]:
            ax.axis("off")
        axes[0][1].text(0.5, 0.5, "no cases", ha="center", va="center")
    legend = [Patch(color=LUNG_RGB, label="lung"), Patch(color=INF_RGB, label="infection")]
    fig.legend(handles=legend + (ERROR_LEGEND if errors else []), loc="upper right",
               ncol=len(legend) + (len(ERROR_LEGEND) if errors else 0), fontsize=9)
    if title:
        fig.suptitle(title, x=0.02, ha="left")  # left, clear of the legend on the right
    fig.tight_layout(rect=(0, 0, 1, 0.96))
    return _save(fig, out, palette=256, dpi=90)


def plot_dice_histograms(values: Mapping[str, np.ndarray], out: Path) -> Path:
    """Histogram of per-image Dice, one panel per task; the mean is marked. The x axis starts at
    0, or at the tenth below the lowest Dice when all are high, so a tight cluster still shows its
    spread."""
    every = [(k, np.asarray(v, np.float64)) for k, v in values.items()]
    every = [(k, v[np.isfinite(v)]) for k, v in every]
    items = [(k, v) for k, v in every if v.size] or every[:1]  # an empty panel only when all are empty
    lows = [float(np.floor(v.min() * 10) / 10) if v.min() >= 0.5 else 0.0 for _, v in items if v.size]
    lo = min(lows, default=0.0)  # one x range for every panel
    fig, axes = plt.subplots(1, max(len(items), 1), figsize=(4.8 * max(len(items), 1), 3.6), squeeze=False)
    for ax, (name, v) in zip(axes[0], items):
        bins = np.linspace(lo, 1, 21)
        ax.set_title(f"{name} Dice per image (n={v.size})")
        ax.set_xlim(lo, 1)
        ax.set_xlabel("Dice")
        ax.set_ylabel("images")
        ax.yaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if v.size == 0:
            ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(v, bins=bins, color="C0", edgecolor="white")
        ax.axvline(v.mean(), color="C3", ls="--", label=f"mean {v.mean():.3f}")
        ax.legend(fontsize=9, loc="upper left")
    fig.tight_layout()
    return _save(fig, out)

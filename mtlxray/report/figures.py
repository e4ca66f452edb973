"""PNG figures: loss curves per phase, confusion matrix, mask overlays and Dice histograms.

Everything renders with matplotlib's Agg backend (no display needed) and is written atomically.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402

logger = logging.getLogger(__name__)

LUNG_RGB = (0.15, 0.75, 0.95)
"""Lung overlay colour (cyan-blue)."""
INF_RGB = (1.0, 0.25, 0.1)
"""Infection overlay colour (red-orange)."""
_ALPHA = {"lung": 0.35, "inf": 0.65}
"""Blend weight per mask; infection is stronger so it stays visible on top of lung."""


@dataclass(frozen=True)
class OverlayCase:
    """One row of an overlay grid: the image, its true masks and the predicted masks (H×W each)."""

    title: str
    image: np.ndarray
    lung_true: np.ndarray
    inf_true: np.ndarray
    lung_pred: np.ndarray
    inf_pred: np.ndarray


def _save(fig: plt.Figure, out: Path) -> Path:
    """Write the figure to `out` through a temp file, then close it."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.stem}.", suffix=".png")
    os.close(fd)
    try:
        fig.savefig(tmp, dpi=110, bbox_inches="tight")
        os.replace(tmp, out)
    finally:
        plt.close(fig)
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.debug("wrote %s", out)
    return out


def overlay_rgb(image: np.ndarray, lung: np.ndarray, inf: np.ndarray) -> np.ndarray:
    """Blend masks onto a grayscale image: lung in LUNG_RGB, infection in INF_RGB on top.

    image: H×W uint8 or float in [0, 1]; lung, inf: H×W bool/0-1. Returns H×W×3 uint8.
    """
    img = image.astype(np.float32)
    if image.dtype == np.uint8:
        img = img / 255.0
    rgb = np.repeat(img[..., None], 3, axis=-1)  # H×W×3
    for mask, colour, alpha in ((lung, LUNG_RGB, _ALPHA["lung"]), (inf, INF_RGB, _ALPHA["inf"])):
        m = mask.astype(bool)[..., None]  # H×W×1
        rgb = np.where(m, (1 - alpha) * rgb + alpha * np.asarray(colour, np.float32), rgb)
    return (rgb.clip(0, 1) * 255).round().astype(np.uint8)


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
    fig, axes = plt.subplots(1, len(phases), figsize=(6.0 * len(phases), 4.2), squeeze=False)
    for ax, (title, path) in zip(axes[0], phases.items()):
        series = _loss_series(read_metrics_jsonl(path))
        tasks = sorted({task for _, task in series}, key=lambda t: (t != "loss", t))
        for i, task in enumerate(tasks):
            colour = f"C{i}"
            name = "total" if task == "loss" else task.split("/", 1)[1]
            if ("train", task) in series:
                ax.plot(*series["train", task], color=colour, lw=1.3, alpha=0.85, label=f"train {name}")
            if ("val", task) in series:
                ax.plot(*series["val", task], color=colour, lw=1.6, ls="--", marker="o", ms=4,
                        label=f"val {name}")
        ax.set_title(title)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8, ncol=2)
        else:
            ax.text(0.5, 0.5, "no loss records", ha="center", va="center", transform=ax.transAxes)
    fig.suptitle("Training (solid) and validation (dashed) loss")
    fig.tight_layout()
    return _save(fig, out)


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


def plot_overlay_grid(cases: Sequence[OverlayCase], out: Path, title: str = "") -> Path:
    """One row per case: image, ground truth overlay, prediction overlay."""
    n = max(len(cases), 1)
    fig, axes = plt.subplots(n, 3, figsize=(9.0, 3.1 * n), squeeze=False)
    for row, case in zip(axes, cases):
        panels = (
            ("image", np.repeat(case.image[..., None], 3, -1) if case.image.ndim == 2 else case.image),
            ("ground truth", overlay_rgb(case.image, case.lung_true, case.inf_true)),
            ("prediction", overlay_rgb(case.image, case.lung_pred, case.inf_pred)),
        )
        for ax, (name, rgb) in zip(row, panels):
            ax.imshow(rgb, cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(name, fontsize=9)
        row[0].set_ylabel(case.title, fontsize=8)
    if not cases:
        for ax in axes[0]:
            ax.axis("off")
        axes[0][1].text(0.5, 0.5, "no cases", ha="center", va="center")
    legend = [Patch(color=LUNG_RGB, label="lung"), Patch(color=INF_RGB, label="infection")]
    fig.legend(handles=legend, loc="upper right", ncol=2, fontsize=9)
    if title:
        fig.suptitle(title, x=0.4)
    fig.tight_layout(rect=(0, 0, 1, 0.97))
    return _save(fig, out)


def plot_dice_histograms(values: Mapping[str, np.ndarray], out: Path) -> Path:
    """Histogram of per-image Dice, one panel per task; the mean is marked. The x axis starts at
    0, or at the tenth below the lowest Dice when all are high, so a tight cluster still shows its
    spread."""
    items = [(k, np.asarray(v, np.float64)) for k, v in values.items()]
    fig, axes = plt.subplots(1, max(len(items), 1), figsize=(4.8 * max(len(items), 1), 3.6), squeeze=False)
    for ax, (name, v) in zip(axes[0], items):
        v = v[np.isfinite(v)]
        lo = float(np.floor(v.min() * 10) / 10) if v.size and v.min() >= 0.5 else 0.0
        bins = np.linspace(lo, 1, 21)
        ax.set_title(f"{name} Dice per image (n={v.size})")
        ax.set_xlim(lo, 1)
        ax.set_xlabel("Dice")
        ax.set_ylabel("images")
        ax.grid(alpha=0.3)
        if v.size == 0:
            ax.text(0.5, 0.5, "no images", ha="center", va="center", transform=ax.transAxes)
            continue
        ax.hist(v, bins=bins, color="C0", edgecolor="white")
        ax.axvline(v.mean(), color="C3", ls="--", label=f"mean {v.mean():.3f}")
        ax.legend(fontsize=9, loc="upper left")
    fig.tight_layout()
    return _save(fig, out)

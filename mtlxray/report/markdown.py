"""Markdown tables for evaluation reports and the demo report, and an atomic text writer."""

from __future__ import annotations

import math
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

SEG_ROWS = (("Dice", "dice"), ("IoU", "iou"), ("Pixel accuracy", "pixel_accuracy"),
            ("Sensitivity", "sensitivity"), ("Specificity", "specificity"))


def write_text_atomic(path: Path, text: str) -> Path:
    """Write `text` to `path` through a temp file in the same folder, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def fmt(value: object, digits: int = 4) -> str:
    """A number for a table: fixed digits, "n/a" for missing or nan."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def fmt_ci(ci: Sequence[float | None] | None) -> str:
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return "n/a"
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def segmentation_table(metrics: Mapping) -> str:
    """Lung and infection metrics, mean over images and global, with CIs on the mean Dice."""
    lung, inf, ci = metrics["lung"], metrics["infection"], metrics.get("ci95", {})
    rows = []
    for label, key in SEG_ROWS:
        rows.append([label, lung.get(key), lung.get(f"{key}_global"), inf.get(key), inf.get(f"{key}_global")])
    rows.append(["Dice 95% CI (mean)", fmt_ci(ci.get("lung_dice")), "", fmt_ci(ci.get("inf_dice")), ""])
    rows.append(["Images", metrics["lung"].get("n_images"), "", metrics["infection"].get("n_images"), ""])
    return table(["Metric", "Lung (mean)", "Lung (global)", "Infection (mean)", "Infection (global)"], rows)


def classification_tables(metrics: Mapping) -> str:
    """Headline classification figures, per-class figures and the confusion matrix."""
    c, ci, names = metrics["classification"], metrics.get("ci95", {}), metrics["class_names"]
    head = table(["Metric", "Value", "95% CI"], [
        ["Accuracy", c["accuracy"], fmt_ci(ci.get("accuracy"))],
        ["Macro F1", c["f1_macro"], fmt_ci(ci.get("f1_macro"))],
        ["Macro precision", c["precision_macro"], ""],
        ["Macro recall (sensitivity)", c["recall_macro"], ""],
        ["Macro specificity", c["specificity_macro"], ""],
        ["Macro one-vs-rest AUC", c["auc_macro"], fmt_ci(ci.get("auc_macro"))],
    ])
    per = table(["Class", "Precision", "Recall", "Specificity", "F1", "AUC (one-vs-rest)"], [
        [n, c[f"precision/{n}"], c[f"recall/{n}"], c[f"specificity/{n}"], c[f"f1/{n}"], c[f"auc/{n}"]]
        for n in names
    ])
    cm = table(["true \\ predicted", *names], [[n, *row] for n, row in zip(names, metrics["confusion"])])
    return f"{head}\n{per}\n{cm}"


def evaluation_markdown(metrics: Mapping, figures: Mapping[str, str], heading: str = "#") -> str:
    """The body of an evaluation report: what was evaluated, the tables, and the figures (relative paths)."""
    h = heading
    lines = [
        f"{h} Evaluation: {metrics['subset']} subset, {metrics['split']} split\n",
        f"Checkpoint `{metrics['checkpoint']}`, shards `{metrics['shards']}`, "
        f"{metrics['n_images']} images, {metrics['world_size']} process(es). "
        f"Masks are thresholded at probability 0.5. Infection metrics are computed on COVID-19 images "
        f"that have an infection mask only ({metrics['infection']['n_images']} images); a Dice of "
        f"an empty prediction on an empty mask counts as 1. Intervals are 95% percentile bootstrap "
        f"intervals over images ({metrics['bootstrap']} resamples).\n",
        f"{h}# Segmentation\n",
        segmentation_table(metrics),
        f"{h}# Classification\n",
        classification_tables(metrics),
    ]
    if figures:
        lines.append(f"{h}# Figures\n")
        for title, rel in figures.items():
            lines.append(f"**{title}**\n\n![{title}]({rel})\n")
    return "\n".join(lines)


def manifest_tables(manifest: Mapping) -> str:
    """Table I/II-style Markdown from a shard manifest: one table per subset, classes × splits."""
    titles = {"lung": "Lung segmentation subset (Table I)", "infection": "Infection segmentation subset (Table II)"}
    parts = []
    counts = manifest["counts"]
    for subset in [s for s in titles if s in counts] + sorted(set(counts) - set(titles)):
        splits = counts[subset]
        names = [s for s in ("train", "val", "test") if s in splits] + sorted(set(splits) - {"train", "val", "test"})
        classes = manifest["classes"][subset]
        rows = [[c, *(splits[s].get(c, 0) for s in names), sum(splits[s].get(c, 0) for s in names)]
                for c in classes]
        rows.append(["**total**", *(sum(splits[s].values()) for s in names),
                     sum(sum(splits[s].values()) for s in names)])
        parts.append(f"**{titles.get(subset, subset)}**\n\n"
                     + table(["Class", *(s.capitalize() for s in names), "Total"], rows))
    return "\n".join(parts)

"""Markdown tables for evaluation reports and the demo report."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from mtlxray.data.manifest import Manifest

SEG_ROWS = (("Dice", "dice"), ("IoU", "iou"), ("Pixel accuracy", "pixel_accuracy"),
            ("Sensitivity", "sensitivity"), ("Specificity", "specificity"))


def fmt(value: object, digits: int = 4) -> str:
    """A number for a table: fixed digits, "n/a" for missing or nan."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def rel_path(path: object, base: Optional[str | Path]) -> str:
    """`path` relative to the folder `base` (a report's own folder), so that the report moves with
    the results; as given without a base."""
    if base is None or path is None:
        return str(path)
    return os.path.relpath(Path(path).resolve(), Path(base).resolve())


def provenance_line(info: Mapping) -> str:
    """`mtlxray 0.1.0 (commit 1a2b3c4d5e6f), torch 2.13.0, config hash 0123456789ab`; empty without them."""
    if "mtlxray_version" not in info:
        return ""
    commit = info.get("git_commit")
    if commit:
        commit = f"commit {commit[:12]}{'+dirty' if commit.endswith('+dirty') else ''}"
    line = f"mtlxray {info['mtlxray_version']} ({commit or 'no git commit'}), torch {info.get('torch_version')}"
    return line + (f", config hash {info['config_hash']}" if info.get("config_hash") else "")


def fmt_ci(ci: Sequence[float | None] | None) -> str:
    if not ci or any(v is None or math.isnan(v) for v in ci):
        return "n/a"
    return f"[{ci[0]:.4f}, {ci[1]:.4f}]"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A GitHub-flavoured Markdown table."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def segmentation_table(summary: Mapping) -> str:
    """Lung and infection metrics, mean over images and global, with CIs on the mean Dice."""
    m, ci = summary["metrics"], summary.get("ci95", {})
    tasks = [t for t in ("lung", "inf") if f"{t}_dice" in m]
    if not tasks:
        return "The model has no segmentation output.\n"
    headers = ["Metric"]
    for t in tasks:
        name = "Lung" if t == "lung" else "Infection"
        headers += [f"{name} (mean)", f"{name} (global)"]
    rows = [[label, *(v for t in tasks for v in (m.get(f"{t}_{key}"), m.get(f"{t}_{key}_global")))]
            for label, key in SEG_ROWS]
    rows.append(["Dice 95% CI (mean)", *(v for t in tasks for v in (fmt_ci(ci.get(f"{t}_dice")), ""))])
    rows.append(["Images", *(v for t in tasks for v in (m.get(f"{t}_n"), ""))])
    text = table(headers, rows)
    if "inf_fp_share" in m:
        text += ("\n" + table(["Infection on negative images", "Value"], [
            ["Images with any predicted infection", fmt_pct(m["inf_fp_share"])],
            ["Mean predicted infection area (% of predicted lung)", fmt(m["inf_fp_area_pct"], 2)],
            ["Negative images", m["inf_negatives_n"]]]))
    return text


def fmt_pct(value: object) -> str:
    return "n/a" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{100 * value:.1f}%"


def classification_tables(summary: Mapping) -> str:
    """Headline classification figures, per-class figures and the confusion matrix."""
    m, ci, names = summary["metrics"], summary.get("ci95", {}), summary["class_names"]
    if "accuracy" not in m:
        return "The model has no class output.\n"
    head = table(["Metric", "Value", "95% CI"], [
        ["Accuracy", m["accuracy"], fmt_ci(ci.get("accuracy"))],
        ["Macro F1", m["f1_macro"], fmt_ci(ci.get("f1_macro"))],
        ["Macro precision", m["precision_macro"], fmt_ci(ci.get("precision_macro"))],
        ["Macro recall (sensitivity)", m["recall_macro"], fmt_ci(ci.get("recall_macro"))],
        ["Macro specificity", m["specificity_macro"], ""],
        ["Macro one-vs-rest AUC", m["auc_macro"], fmt_ci(ci.get("auc_macro"))],
        *([["Macro F1 at 0.5 (each class's sigmoid on its own)", m["f1_at_0.5_macro"],
            fmt_ci(ci.get("f1_at_0.5_macro"))]] if "f1_at_0.5_macro" in m else []),
    ])
    at_half = "f1_at_0.5_macro" in m  # a multi-label head: each class's own sigmoid at 0.5
    per = table(["Class", "Precision", "Recall", "Specificity", "F1", "AUC (one-vs-rest)",
                 *(["F1 at 0.5"] if at_half else [])], [
        [n, m[f"precision/{n}"], m[f"recall/{n}"], m[f"specificity/{n}"], m[f"f1/{n}"], m[f"auc/{n}"],
         *([m[f"f1_at_0.5/{n}"]] if at_half else [])]
        for n in names
    ])
    cm = table(["true \\ predicted", *names], [[n, *row] for n, row in zip(names, summary["confusion"])])
    return f"{head}\n{per}\n{cm}"


def detection_gate_table(summary: Mapping) -> str:
    """Infection boxes (mAP, false positives on negatives) and the gate's effect, ungated beside
    gated; empty for a model without a box head and an evaluation without a gate."""
    m = summary["metrics"]
    det, gated = "det_map" in m, "gate_sensitivity" in m
    if not det and not gated:
        return ""
    rows = []
    if det:
        rows += [["Box mAP@0.5", m["det_map_50"], m.get("det_map_50_gated", "")],
                 ["Box mAP@[.5:.95]", m["det_map"], m.get("det_map_gated", "")],
                 ["Negative images with a reported box", fmt_pct(m["det_fp_share"]),
                  fmt_pct(m["det_fp_share_gated"]) if "det_fp_share_gated" in m else ""]]
    if "inf_dice_gated" in m:
        rows += [["Infection Dice (positives, mean)", m["inf_dice"], m["inf_dice_gated"]],
                 ["Negative images with any predicted infection", fmt_pct(m["inf_fp_share"]),
                  fmt_pct(m["inf_fp_share_gated"])]]
    if gated:
        rows += [["Gate: positives passed (sensitivity)", "", m["gate_sensitivity"]],
                 ["Gate: negatives stopped (specificity)", "", m["gate_specificity"]]]
    note = f"Gate: {summary['gate']}. " if summary.get("gate") else "No gate. "
    boxes = (f"Boxes: mAP over the {int(m['det_n'])} images with infection annotations (COCO definition, "
             f"torchmetrics); false positives on {int(m['det_negatives_n'])} negative images. ") if det else ""
    return f"{note}{boxes}An image the gate stops reports no infection and no box.\n\n" + table(
        ["Metric", "Ungated", "Gated"], rows)


def leakage_note(leakage: Mapping | None) -> str:
    """What the duplicate audit said about the evaluated split and the model's training data."""
    if not leakage:
        return ""
    if leakage.get("note") == "no training run":
        return "Leakage audit: not applicable (a model without a training run).\n"
    parts = []
    if leakage["checked_against"]:
        n = leakage["overlapping_images"]
        against = "; ".join(f"`{w}`" for w in leakage["checked_against"])
        parts.append(f"Leakage audit: the evaluated split shares **{n}** image(s) with the training data ({against})"
                     + (", evaluated anyway with `--allow-leakage`: treat these figures as inflated." if n else "."))
    if leakage["not_checked"]:
        parts.append("Not checked: " + "; ".join(leakage["not_checked"]) + ".")
    return " ".join(parts) + "\n"


def infection_count(m: Mapping, positives: str) -> str:
    """`12 COVID-19 images`, or `0 of 15 COVID-19 images have an infection mask` when some have none."""
    scored, of = int(m["inf_n"]), m.get("inf_positives_n")
    if of is None or int(of) == scored:
        return f"{scored} {positives} images"
    return f"{scored} of {int(of)} {positives} images have an infection mask"


def evaluation_markdown(summary: Mapping, figures: Mapping[str, str], heading: str = "#",
                        base: Optional[str | Path] = None) -> str:
    """The body of an evaluation report: what was evaluated, the tables, and the figures (relative paths).
    `base`: the report's folder; the checkpoint, weights and shards are named relative to it."""
    h, m = heading, summary["metrics"]
    positives = "/".join(summary.get("infection_classes", ["COVID-19"]))
    if "inf_n" in m:
        inf_note = (f"Infection metrics are computed on {positives} images that have an infection mask only "
                    f"({infection_count(m, positives)}); on the other classes the share of images with any "
                    "predicted infection is reported instead. ")
    else:
        inf_note = f"The model has no infection head in {summary.get('phase', 'this phase')}: no infection metrics. "
    lines = [
        f"{h} Evaluation: {summary['subset']} subset, {summary['split']} split\n",
        (f"Checkpoint `{rel_path(summary['checkpoint'], base)}`" if summary.get("checkpoint") else
         f"Model config `{summary.get('model_config')}` with its own weights `{summary.get('weights')}` (no training "
         "run)") + f", shards `{rel_path(summary['shards'], base)}`, "
        f"{int(m['n_images'])} images, {summary['world_size']} process(es). "
        + (f"Made by {provenance_line(summary)}. " if provenance_line(summary) else "") +
        f"Masks are thresholded at probability 0.5. {inf_note}A Dice of an empty prediction on an empty mask "
        f"counts as 1. Macro averages cover the classes present in the split. Intervals are 95% percentile "
        f"bootstrap intervals over images ({summary['bootstrap']} resamples).\n",
        leakage_note(summary.get("leakage")),
        f"{h}# Segmentation\n",
        segmentation_table(summary),
        f"{h}# Classification\n",
        classification_tables(summary),
    ]
    if detection_gate_table(summary):
        lines += [f"{h}# Infection boxes and the gate\n", detection_gate_table(summary)]
    if figures:
        lines.append(f"{h}# Figures\n")
        for title, rel in figures.items():
            lines.append(f"**{title}**\n\n![{title}]({rel})\n")
    return "\n".join(lines)


def manifest_tables(manifest: Manifest) -> str:
    """Table I/II-style Markdown from a shard manifest: one table per subset, classes × splits."""
    titles = {"lung": "Lung segmentation subset (Table I)", "infection": "Infection segmentation subset (Table II)"}
    parts = []
    counts = manifest.counts
    for subset in [s for s in titles if s in counts] + sorted(set(counts) - set(titles)):
        splits = counts[subset]
        names = [s for s in ("train", "val", "test") if s in splits] + sorted(set(splits) - {"train", "val", "test"})
        classes = manifest.classes[subset]
        rows = [[c, *(splits[s].get(c, 0) for s in names), sum(splits[s].get(c, 0) for s in names)]
                for c in classes]
        rows.append(["**total**", *(sum(splits[s].values()) for s in names),
                     sum(sum(splits[s].values()) for s in names)])
        parts.append(f"**{titles.get(subset, subset)}**\n\n"
                     + table(["Class", *(s.capitalize() for s in names), "Total"], rows))
    return "\n".join(parts)

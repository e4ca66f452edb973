"""`mtlxray compare --sweep DIR`: a sweep's figures over seeds, and paired comparisons of its points.

A sweep (`mtlxray sweep`, DIR/sweep.json) holds, per point and seed, the evaluation of the chain's
best checkpoint: DIR/<point>/seed<k>/eval-<subset>/metrics.json, with its per-image records.

Per point, subset and metric:
- the seeds' values, their mean and sample standard deviation, and a 95% interval over seeds
  (Student's t: mean ± t(0.975, n-1) · sd / √n);
- a 95% bootstrap interval over images within seeds: each resample draws every seed's images with
  replacement, takes each seed's metric and averages over seeds (metrics that are means of per-image
  values: lung Dice, infection Dice, accuracy).

A paired comparison of points A and B takes, for every seed and test image evaluated under both,
the difference of the per-image value (A − B), then states the mean difference with a 95%
percentile-bootstrap interval over the pairs and the Wilcoxon signed-rank p-value (scipy):
"A − B = x [lo, hi], p = ...".

Writes DIR/report.md, DIR/summary.csv, DIR/summary.json and one figure per metric
(DIR/figures/<subset>_<metric>.png: each point's mean with its interval over seeds, and its seeds).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from mtlxray.errors import ConfigError
from mtlxray.io import write_json_atomic, write_text_atomic

__all__ = ["METRICS", "PER_IMAGE", "PointSummary", "Paired", "load_sweep", "summarise_point", "paired_comparison",
           "mean_bootstrap_ci", "seed_bootstrap_ci", "write_sweep_report"]

logger = logging.getLogger(__name__)

METRICS = (("lung_dice", "lung Dice"), ("inf_dice", "infection Dice"), ("accuracy", "accuracy"),
           ("f1_macro", "macro F1"), ("auc_macro", "macro AUC"))
"""metrics.json names -> titles; a metric appears when an evaluation has it."""

PER_IMAGE = ("lung_dice", "inf_dice", "accuracy")
"""Metrics that are the mean of a per-image value: bootstrapped over images and compared pairwise."""


def per_image_values(summary: dict, metric: str) -> dict[str, float]:
    """{image key: value} of a per-image metric from an evaluation's metrics.json (images it scores)."""
    per = summary["per_image"]
    if metric == "accuracy":
        if "predicted" not in per:
            return {}
        return {k: float(p == y) for k, p, y in zip(per["key"], per["predicted"], per["label"])}
    if metric not in per:
        return {}
    return {k: float(v) for k, v in zip(per["key"], per[metric]) if v is not None}


@dataclass
class Evaluation:
    """One element's evaluation of one subset."""

    point: str
    seed: int
    subset: str
    path: Path
    summary: dict


def load_sweep(sweep_dir: str | Path) -> tuple[dict, list[Evaluation]]:
    """sweep.json and every finished element's evaluations (an element without one is left out, logged)."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "sweep.json"
    if not path.is_file():
        raise ConfigError(f"{sweep_dir}: no sweep.json (not a folder written by `mtlxray sweep`)")
    sweep = json.loads(path.read_text())
    evaluations = []
    for element in sweep["elements"]:
        for subset in sweep["eval_subsets"]:
            metrics = Path(element["dir"]) / f"eval-{subset}" / "metrics.json"
            if not metrics.is_file():
                logger.warning("%s seed %d: no evaluation of %s (%s)", element["point"], element["seed"], subset,
                               element.get("state", "?"))
                continue
            evaluations.append(Evaluation(element["point"], int(element["seed"]), subset, metrics,
                                          json.loads(metrics.read_text())))
    if not evaluations:
        raise ConfigError(f"{sweep_dir}: no element has finished its evaluation yet")
    return sweep, evaluations


def seed_interval(values: Sequence[float]) -> tuple[Optional[float], Optional[float]]:
    """95% interval of the mean over seeds: mean ± t(0.975, n-1)·sd/√n (None with fewer than 2 seeds)."""
    from scipy import stats

    if len(values) < 2:
        return None, None
    mean, sd = statistics.mean(values), statistics.stdev(values)
    half = float(stats.t.ppf(0.975, len(values) - 1)) * sd / math.sqrt(len(values))
    return mean - half, mean + half


def mean_bootstrap_ci(diffs: np.ndarray, n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean of `diffs`: resample the values with replacement.

    Written out (not scipy.stats.bootstrap) so that the resamples are plain `rng.integers` draws
    that `seed_bootstrap_ci` shares and a reader can repeat."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(diffs), size=(n_boot, len(diffs)))
    means = diffs[idx].mean(axis=1)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def seed_bootstrap_ci(per_seed: Sequence[np.ndarray], n_boot: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile-bootstrap interval of the mean over seeds of each seed's per-image mean: each
    resample draws every seed's images with replacement (the seeds are kept, the images vary)."""
    rng = np.random.default_rng(seed)
    means = np.zeros(n_boot)
    for values in per_seed:
        idx = rng.integers(0, len(values), size=(n_boot, len(values)))
        means += values[idx].mean(axis=1)
    means /= len(per_seed)
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


@dataclass
class MetricSummary:
    metric: str
    seeds: list[int]
    values: list[float]
    mean: float
    sd: Optional[float]
    """Sample standard deviation over seeds; None with one seed."""
    seed_ci95: list[Optional[float]]
    image_ci95: list[Optional[float]] = field(default_factory=lambda: [None, None])


@dataclass
class PointSummary:
    point: str
    subset: str
    n_images: int
    metrics: dict[str, MetricSummary]


def summarise_point(evaluations: Sequence[Evaluation], n_boot: int = 1000) -> PointSummary:
    """One point's evaluations of one subset (one per seed) as figures over seeds."""
    evaluations = sorted(evaluations, key=lambda e: e.seed)
    first = evaluations[0]
    metrics: dict[str, MetricSummary] = {}
    for name, _ in METRICS:
        got = [(e.seed, e.summary["metrics"].get(name)) for e in evaluations]
        got = [(s, float(v)) for s, v in got if v is not None and not math.isnan(float(v))]
        if not got:
            continue
        values = [v for _, v in got]
        summary = MetricSummary(name, [s for s, _ in got], values, statistics.mean(values),
                                statistics.stdev(values) if len(values) > 1 else None, list(seed_interval(values)))
        if name in PER_IMAGE and n_boot > 0:
            per_seed = [np.array(list(per_image_values(e.summary, name).values())) for e in evaluations]
            per_seed = [v for v in per_seed if len(v)]
            if per_seed:
                summary.image_ci95 = list(seed_bootstrap_ci(per_seed, n_boot))
        metrics[name] = summary
    return PointSummary(first.point, first.subset, int(first.summary["metrics"].get("n_images") or 0), metrics)


@dataclass
class Paired:
    """A − B on the images and seeds both were evaluated on."""

    a: str
    b: str
    subset: str
    metric: str
    n_pairs: int
    seeds: list[int]
    mean_diff: float
    ci95: list[float]
    p_wilcoxon: Optional[float]

    def __str__(self) -> str:
        p = "n/a (all differences zero)" if self.p_wilcoxon is None else f"{self.p_wilcoxon:.3g}"
        return (f"{self.a} − {self.b} = {self.mean_diff:+.4f} [{self.ci95[0]:+.4f}, {self.ci95[1]:+.4f}], "
                f"p = {p} ({self.metric}, {self.subset}, {self.n_pairs} image×seed pairs)")


def paired_differences(a: Sequence[Evaluation], b: Sequence[Evaluation], metric: str) -> tuple[np.ndarray, list[int]]:
    """A − B per (seed, image) present in both, ordered by seed then image key; and the seeds used."""
    by_seed_b = {e.seed: per_image_values(e.summary, metric) for e in b}
    diffs, seeds = [], []
    for ea in sorted(a, key=lambda e: e.seed):
        if ea.seed not in by_seed_b:
            continue
        va, vb = per_image_values(ea.summary, metric), by_seed_b[ea.seed]
        keys = sorted(set(va) & set(vb))
        if keys:
            seeds.append(ea.seed)
            diffs.extend(va[k] - vb[k] for k in keys)
    return np.array(diffs, dtype=np.float64), seeds


def paired_comparison(a: Sequence[Evaluation], b: Sequence[Evaluation], metric: str, n_boot: int = 1000,
                      seed: int = 0) -> Optional[Paired]:
    """Point A against point B on one metric (see the module docstring); None when they share no image."""
    from scipy import stats

    diffs, seeds = paired_differences(a, b, metric)
    if not len(diffs):
        return None
    # scipy raises when every difference is zero (nothing to rank): there is no evidence either way.
    p = None if not np.any(diffs) else float(stats.wilcoxon(diffs).pvalue)
    lo, hi = mean_bootstrap_ci(diffs, n_boot, seed)
    return Paired(a[0].point, b[0].point, a[0].subset, metric, len(diffs), seeds, float(diffs.mean()), [lo, hi], p)


def _interval(ci: Sequence[Optional[float]]) -> str:
    return "–" if ci[0] is None else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _plot(points: list[PointSummary], metric: str, title: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [p for p in points if metric in p.metrics]
    fig, ax = plt.subplots(figsize=(max(4.0, 1.2 * len(rows) + 1.5), 3.2))
    for x, p in enumerate(rows):
        m = p.metrics[metric]
        lo, hi = m.seed_ci95
        if lo is not None:
            ax.errorbar([x], [m.mean], yerr=[[m.mean - lo], [hi - m.mean]], fmt="o", color="C0", capsize=4,
                        label="mean, 95% interval over seeds" if x == 0 else None)
        else:
            ax.plot([x], [m.mean], "o", color="C0", label="mean" if x == 0 else None)
        ax.plot([x + 0.12] * len(m.values), m.values, "x", color="C1", label="seeds" if x == 0 else None)
    ax.set_xticks(range(len(rows)), [p.point for p in rows], rotation=20, ha="right")
    ax.set_ylabel(title)
    ax.set_title(f"{title} ({rows[0].subset} test)" if rows else title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(path)


def default_pairs(points: Sequence[str]) -> list[tuple[str, str]]:
    """Every later point against the first."""
    return [(p, points[0]) for p in points[1:]]


def write_sweep_report(sweep_dir: str | Path, pairs: Optional[Sequence[tuple[str, str]]] = None,
                       n_boot: int = 1000, out: Optional[str | Path] = None) -> dict:
    """Aggregate the sweep into OUT (default the sweep's folder): report.md, summary.csv, summary.json,
    figures/. Returns the summary that summary.json holds."""
    sweep_dir = Path(sweep_dir)
    out = Path(out) if out is not None else sweep_dir
    sweep, evaluations = load_sweep(sweep_dir)
    point_names = [p["name"] for p in sweep["points"]]
    for a, b in pairs or ():
        for name in (a, b):
            if name not in point_names:
                raise ConfigError(f"--pair {a} {b}: no point {name!r} in the sweep (points: {', '.join(point_names)})")
    pairs = list(pairs) if pairs else default_pairs(point_names)
    groups: dict[tuple[str, str], list[Evaluation]] = {}
    for e in evaluations:
        groups.setdefault((e.subset, e.point), []).append(e)
    summaries = [summarise_point(groups[(s, p)], n_boot) for s in sweep["eval_subsets"] for p in point_names
                 if (s, p) in groups]
    comparisons = []
    for subset in sweep["eval_subsets"]:
        for a, b in pairs:
            if (subset, a) in groups and (subset, b) in groups:
                for metric in PER_IMAGE:
                    result = paired_comparison(groups[(subset, a)], groups[(subset, b)], metric, n_boot)
                    if result is not None:
                        comparisons.append(result)
    figures = []
    for subset in sweep["eval_subsets"]:
        rows = [s for s in summaries if s.subset == subset]
        for metric, title in METRICS:
            if any(metric in r.metrics for r in rows):
                path = out / "figures" / f"{subset}_{metric}.png"
                _plot(rows, metric, title, path)
                figures.append(path)
    result = {"sweep": sweep["name"], "n_boot": n_boot,
              "points": [{"point": s.point, "subset": s.subset, "n_images": s.n_images,
                          "metrics": {k: asdict(m) for k, m in s.metrics.items()}} for s in summaries],
              "paired": [asdict(c) | {"statement": str(c)} for c in comparisons]}
    write_json_atomic(out / "summary.json", result, indent=1)
    write_text_atomic(out / "summary.csv", _csv(summaries))
    write_text_atomic(out / "report.md", _markdown(sweep, summaries, comparisons, figures, out, n_boot))
    return result


def _csv(summaries: Sequence[PointSummary]) -> str:
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["point", "subset", "metric", "n_seeds", "mean", "sd", "seed_ci_lo", "seed_ci_hi",
                     "image_ci_lo", "image_ci_hi", "seeds", "values"])
    def num(v: Optional[float]) -> str:
        return "" if v is None else f"{v:.6g}"

    for s in summaries:
        for m in s.metrics.values():
            writer.writerow([s.point, s.subset, m.metric, len(m.values), num(m.mean), num(m.sd),
                             num(m.seed_ci95[0]), num(m.seed_ci95[1]), num(m.image_ci95[0]), num(m.image_ci95[1]),
                             " ".join(map(str, m.seeds)), " ".join(f"{v:.6g}" for v in m.values)])
    return buf.getvalue()


def _markdown(sweep: dict, summaries: Sequence[PointSummary], comparisons: Sequence[Paired], figures: list[Path],
              out: Path, n_boot: int) -> str:
    lines = [f"# Sweep `{sweep['name']}`", "",
             f"Configs: {', '.join(f'`{Path(c).name}`' for c in sweep['configs'])}; seeds "
             f"{', '.join(map(str, sweep['seeds']))}; points: "
             + "; ".join(f"**{p['name']}** ({' '.join(p['overrides']) or 'the configs as they are'})"
                         for p in sweep["points"]) + ".", ""]
    for subset in sweep["eval_subsets"]:
        rows = [s for s in summaries if s.subset == subset]
        if not rows:
            continue
        n = rows[0].n_images
        lines += [f"## {subset} test split ({n} images)", "",
                  "| point | metric | mean ± sd | seeds' values | 95% over seeds | 95% over images |",
                  "|---|---|---:|---|---:|---:|"]
        for s in rows:
            for name, title in METRICS:
                if name in s.metrics:
                    m = s.metrics[name]
                    values = ", ".join(f"{v:.3f} (s{k})" for k, v in zip(m.seeds, m.values))
                    spread = f"{m.mean:.3f} ± {m.sd:.3f}" if m.sd is not None else f"{m.mean:.3f} (one seed)"
                    lines.append(f"| {s.point} | {title} | {spread} | {values} | "
                                 f"{_interval(m.seed_ci95)} | {_interval(m.image_ci95)} |")
        lines.append("")
    lines += ["95% over seeds: mean ± t(0.975, n−1)·sd/√n over the seeds. 95% over images: percentile "
              f"bootstrap ({n_boot} resamples) drawing each seed's test images with replacement, the mean over "
              "seeds of each seed's figure.", ""]
    if comparisons:
        lines += ["## Paired comparisons", "",
                  "Per-image differences paired by seed and image; 95% percentile-bootstrap interval of the mean "
                  "difference over the pairs; p: Wilcoxon signed-rank test (scipy).", ""]
        lines += [f"- {c}" for c in comparisons]
        lines.append("")
    if figures:
        lines += ["## Figures", ""]
        lines += [f"![{f.stem}]({f.relative_to(out).as_posix()})" for f in figures]
        lines.append("")
    return "\n".join(lines)

"""`mtlxray compare RUN_DIR...`: one table of several runs' test metrics with 95% CIs, model size,
GFLOPs per image and measured training speed (the course project's comparison, with intervals).

Each RUN_DIR is a training run folder (`runs/<name>`: config.yaml, metrics.jsonl, checkpoints/),
a folder holding only evaluations (a model evaluated with `evaluate --model-config`, such as
zero-shot CLIP), or an evaluation folder itself (holding metrics.json). For a run folder, the
evaluation is its `eval-*/metrics.json` of the requested split (and subset, when given); with
several, the newest is used and named in the log. A run without one is evaluated first when
`--shards` is given (its `best` checkpoint, else `last`, on that split) into compare's own output,
`OUT/evaluations/<run name>/eval-*`, never into the run folders it reads (a later compare with the
same OUT reuses it); otherwise compare stops and prints the `mtlxray evaluate` command to run. It
never re-evaluates a run that has an evaluation, so a table is as reproducible as the folders it reads.

Per run:
- test metrics and their 95% percentile-bootstrap intervals from metrics.json (`metrics`,
  `ci95`): lung Dice, infection Dice, accuracy, macro precision, recall, F1 and one-vs-rest AUC,
  and the multi-label F1 at 0.5 where a run has it; a metric the model has no output for is `–`;
- parameters (all, and those the run's phase trains) and GFLOPs per image, forward, counted with
  `torch.utils.flop_counter` on the model built from the run's config at `model.img_size`
  (as `mtlxray model-summary`);
- training images/s: the median of the `img_per_s` of the run's metrics.jsonl training lines (all
  ranks together; the median leaves out the first interval's start-up and an interval that also
  held a validation pass), with the world size and precision it ran at.

Writes OUT/compare.md and OUT/compare.csv (one row per run; CI bounds in their own columns) and
prints the Markdown table. `--sweep DIR` aggregates a sweep instead (`mtlxray.report.sweep`).
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mtlxray.config import load_config
from mtlxray.errors import ConfigError
from mtlxray.model import build_model
from mtlxray.model.base import under_prefix
from mtlxray.model.registry import model_tasks
from mtlxray.model.summary import count_flops
from mtlxray.report.evaluate import evaluate_checkpoint

__all__ = ["COLUMNS", "RunSummary", "find_evaluation", "summarise_run", "compare_runs", "markdown_table",
           "csv_table"]

logger = logging.getLogger(__name__)

COLUMNS = (("lung_dice", "lung Dice"), ("inf_dice", "infection Dice"), ("accuracy", "accuracy"),
           ("precision_macro", "macro precision"), ("recall_macro", "macro recall"), ("f1_macro", "macro F1"),
           ("auc_macro", "macro AUC"), ("f1_at_0.5_macro", "macro F1 at 0.5 (multi-label)"))
"""Metric name in metrics.json -> column title; a column appears when any run has the metric."""


@dataclass
class RunSummary:
    """One row of the comparison."""

    name: str
    model: str
    tasks: list[str]
    eval_dir: Path
    split: str
    subset: str
    shards: str
    n_images: int
    metrics: dict[str, Optional[float]]
    ci95: dict[str, list]
    params: int
    trainable_params: int
    gflops_forward: float
    gflops_forward_backward: float
    img_per_s: Optional[float] = None
    world_size: Optional[int] = None
    precision: Optional[str] = None
    train_steps: Optional[int] = None
    notes: list[str] = field(default_factory=list)


def _evaluations(folder: Path) -> list[tuple[Path, dict]]:
    out = []
    for path in sorted(folder.glob("eval-*/metrics.json")):
        try:
            out.append((path.parent, json.loads(path.read_text())))
        except (OSError, json.JSONDecodeError) as e:
            logger.warning("skipping %s: unreadable (%s)", path, e)
    return out


def find_evaluation(run: Path, split: str, subset: Optional[str] = None) -> Optional[Path]:
    """The evaluation folder of `run` for `split` (and `subset`): `run` itself when it holds
    metrics.json, else the newest `run/eval-*` whose metrics.json is of that split; None if none."""
    if (run / "metrics.json").is_file():
        return run
    found = [(d, s) for d, s in _evaluations(run)
             if s.get("split") == split and (subset is None or s.get("subset") == subset)]
    if not found:
        return None
    found.sort(key=lambda item: (item[0] / "metrics.json").stat().st_mtime)
    if len(found) > 1:
        logger.info("%s: %d evaluations of the %s split; using the newest, %s", run, len(found), split,
                    found[-1][0].name)
    return found[-1][0]


def _evaluate_run(run: Path, shards: str, split: str, subset: Optional[str], n_boot: int, into: Path) -> Path:
    """Evaluate the run's best (else last) checkpoint into `into`/eval-<checkpoint>-<shards>-<split>."""
    for link in ("best", "last"):
        ckpt = run / "checkpoints" / link
        if ckpt.exists():
            out = into / f"eval-{link}-{Path(str(shards).rstrip('/')).name or 'shards'}-{subset or 'default'}-{split}"
            logger.info("%s has no evaluation of the %s split: evaluating %s on %s into %s", run, split, ckpt, shards,
                        out)
            return Path(evaluate_checkpoint(ckpt, shards, split=split, subset=subset, n_boot=n_boot, out=out)["out"])
    raise ConfigError(f"{run}: no evaluation of the {split} split and no checkpoints/best or checkpoints/last "
                      "to evaluate")


def _config_of(run: Path, eval_dir: Path, summary: dict):
    """The run's resolved config: the evaluation's config.yaml, the run's, or the checkpoint's."""
    candidates = [eval_dir / "config.yaml", run / "config.yaml"]
    if summary.get("checkpoint"):
        candidates.append(Path(summary["checkpoint"]) / "config.yaml")
    for path in candidates:
        if path.is_file():
            return load_config(path)
    raise ConfigError(f"{run}: no config.yaml beside its evaluation {eval_dir} or in the run folder")


def _training_speed(run: Path) -> tuple[Optional[float], Optional[int], Optional[int]]:
    """(median img/s, world size, last step) of the run's metrics.jsonl training lines, or Nones."""
    path = run / "metrics.jsonl"
    if not path.is_file():
        return None, None, None
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    train = [r for r in lines if r.get("type") == "train" and isinstance(r.get("img_per_s"), (int, float))]
    if not train:
        return None, None, None
    return (statistics.median(r["img_per_s"] for r in train), train[-1].get("world_size"),
            max(r["step"] for r in train))


def _model_cost(cfg) -> tuple[int, int, float, float]:
    """(parameters, parameters the phase trains, forward GFLOPs, forward+backward GFLOPs) per image.

    The trained ones are those the phase's mode uses (`set_mode` parks the rest) outside
    `phase.frozen` and the first `phase.freeze_encoder_blocks` encoder blocks, as the trainer has them."""
    model = build_model(cfg.model, pretrained=False)  # the count needs no weights
    model.set_mode(cfg.phase.name)
    flops = count_flops(model, cfg.model.img_size, cfg.model.in_chans, cfg.phase.name)
    frozen = list(cfg.phase.frozen)
    if cfg.phase.freeze_encoder_blocks:
        frozen += model.encoder_block_prefixes(cfg.phase.freeze_encoder_blocks)
    params = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for name, p in model.named_parameters()
                    if p.requires_grad and not any(under_prefix(name, f) for f in frozen))
    return params, trainable, flops["forward"] / 1e9, flops["forward_backward"] / 1e9


def summarise_run(run: str | Path, *, split: str = "test", subset: Optional[str] = None,
                  shards: Optional[str] = None, n_boot: int = 1000,
                  evaluations: str | Path = Path("compare") / "evaluations") -> RunSummary:
    """Everything the comparison shows about one run (see the module docstring). `evaluations`: where
    a run without an evaluation is evaluated (with `shards`), in a folder named after the run."""
    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"{run}: no such run folder")
    own = Path(evaluations) / run.resolve().name
    eval_dir = find_evaluation(run, split, subset)
    if eval_dir is None and shards is not None:
        eval_dir = find_evaluation(own, split, subset) if own.is_dir() else None
        if eval_dir is None:
            eval_dir = _evaluate_run(run, shards, split, subset, n_boot, own)
    if eval_dir is None:
        ckpt = run / "checkpoints" / "best"
        raise ConfigError(f"{run}: no evaluation of the {split} split; run `mtlxray evaluate --checkpoint {ckpt} "
                          f"--shards SHARDS --split {split}` first, or give compare --shards SHARDS")
    summary = json.loads((eval_dir / "metrics.json").read_text())
    train_dir = run if (run / "metrics.jsonl").is_file() or eval_dir.parent == own else eval_dir.parent
    cfg = _config_of(train_dir, eval_dir, summary)

    params, trainable, gflops, gflops_fb = _model_cost(cfg)
    img_per_s, world, steps = _training_speed(train_dir)
    notes = []
    if summary.get("model_config"):
        notes.append("no training run (evaluated from its config and weights)")
    if not summary.get("bootstrap"):
        notes.append("no bootstrap intervals (evaluated with --bootstrap 0)")
    m = summary["metrics"]
    return RunSummary(
        name=cfg.run.name, model=cfg.model.name, eval_dir=eval_dir,
        tasks=sorted(model_tasks(cfg.model, cfg.phase.name)),  # the outputs of the evaluated phase
        split=summary.get("split", split), subset=summary.get("subset", ""), shards=summary.get("shards", ""),
        n_images=int(m.get("n_images") or 0), metrics={k: m.get(k) for k, _ in COLUMNS if k in m},
        ci95=summary.get("ci95") or {}, params=params, trainable_params=trainable, gflops_forward=gflops,
        gflops_forward_backward=gflops_fb, img_per_s=img_per_s, world_size=world,
        precision=cfg.run.precision if img_per_s is not None else None, train_steps=steps, notes=notes)


def compare_runs(runs: list[str | Path], **kwargs) -> list[RunSummary]:
    """One `RunSummary` per run, in the order given."""
    return [summarise_run(run, **kwargs) for run in runs]


def _num(value) -> Optional[float]:
    return None if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


def _cell(value, ci) -> str:
    value = _num(value)
    if value is None:
        return "–"
    lo, hi = (_num(ci[0]), _num(ci[1])) if ci else (None, None)
    return f"{value:.3f}" if lo is None or hi is None else f"{value:.3f} [{lo:.3f}, {hi:.3f}]"


def _gflops(value: float) -> str:
    return f"{value:.2f}" if value >= 0.1 else f"{value:.3g}"


def _columns(rows: list[RunSummary]) -> list[tuple[str, str]]:
    return [(k, title) for k, title in COLUMNS if any(r.metrics.get(k) is not None for r in rows)]


def markdown_table(rows: list[RunSummary]) -> str:
    """The comparison as Markdown: a table, then where the figures come from."""
    cols = _columns(rows)
    head = ["run", "model", "outputs", f"{rows[0].split if rows else 'test'} images", *(t for _, t in cols),
            "params", "trained params", "GFLOPs/image (fwd)", "training img/s"]
    lines = ["| " + " | ".join(head) + " |",
             "|" + "|".join(["---"] * 3 + ["---:"] * (len(head) - 3)) + "|"]
    for r in rows:
        speed = "– (not trained)" if r.img_per_s is None else \
            f"{r.img_per_s:.1f} ({r.world_size or 1} proc, {r.precision})"
        cells = [r.name, f"`{r.model}`", ", ".join(r.tasks) or "–", str(r.n_images),
                 *(_cell(r.metrics.get(k), r.ci95.get(k)) for k, _ in cols),
                 f"{r.params / 1e6:.2f}M", f"{r.trainable_params / 1e6:.2f}M", _gflops(r.gflops_forward), speed]
        lines.append("| " + " | ".join(cells) + " |")
    where = sorted({(r.shards, r.subset, r.split) for r in rows})
    text = "\n".join(lines) + "\n\n"
    text += ("Metrics on " + "; ".join(f"`{s}` {sub}/{sp}" for s, sub, sp in where)
             + " with 95% percentile-bootstrap intervals over images; `–`: the model has no output for that "
             "metric. GFLOPs per image at `model.img_size`, forward (torch.utils.flop_counter, 2 per "
             "multiply-add). Training img/s: median over the run's log intervals, all processes.\n")
    if len(where) > 1:
        text += "\n**The runs were evaluated on different data: their figures are not comparable.**\n"
    notes = [f"- {r.name}: {n}" for r in rows for n in r.notes]
    if notes:
        text += "\n" + "\n".join(notes) + "\n"
    return text


def csv_table(rows: list[RunSummary]) -> str:
    """The comparison as CSV: one row per run, each metric with its CI bounds in columns of their own."""
    cols = _columns(rows)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["run", "model", "outputs", "shards", "subset", "split", "n_images",
                     *(f"{k}{s}" for k, _ in cols for s in ("", "_ci_lo", "_ci_hi")),
                     "params", "trained_params", "gflops_forward", "gflops_forward_backward", "train_img_per_s",
                     "train_world_size", "train_precision", "train_steps", "eval_dir"])

    def num(v) -> str:
        v = _num(v)
        return "" if v is None else f"{v:.6g}"

    for r in rows:
        metric_cells = []
        for k, _ in cols:
            ci = r.ci95.get(k) or [None, None]
            metric_cells += [num(r.metrics.get(k)), num(ci[0]), num(ci[1])]
        writer.writerow([r.name, r.model, " ".join(r.tasks), r.shards, r.subset, r.split, r.n_images, *metric_cells,
                         r.params, r.trainable_params, f"{r.gflops_forward:.6g}", f"{r.gflops_forward_backward:.6g}",
                         num(r.img_per_s), r.world_size or "", r.precision or "", r.train_steps or "",
                         str(r.eval_dir)])
    return buf.getvalue()

"""`mtlxray evaluate`: every metric of a checkpoint on a shard split, with intervals, figures and a report.

Each process runs the model on its contiguous share of the split and keeps per-image records
(`mtlxray.eval.records.RecordCollector`) and a few best/worst cases for the overlay figure; the
records are gathered once, de-duplicated by sample key, and checked against the manifest's count
(every image is seen exactly once). `mtlxray.eval.records.summarise` computes the metrics under the
names training logs them with; rank 0 writes metrics.json, per_image.csv, report.md, figures and
the resolved config.yaml.

A checkpoint (`--checkpoint`) is evaluated with the config it was trained with; a model without a
training run (zero-shot CLIP) from its config and the local weights that config names
(`--model-config CONFIG [KEY=VALUE ...]`). Every kind of model works: one without a class output
reports no class metrics, one without masks no Dice (and no overlay figure).

The output folder is held for the whole evaluation (`mtlxray.report.outdir`). A `--out` that is
not empty is refused unless `overwrite`, which first deletes what evaluate writes
(`EVALUATE_OUTPUTS`); the default folder, named after the checkpoint, shards, subset and split,
holds that evaluation only, and a rerun replaces it. The files are written into a temp folder
inside it and moved into place only when all are written, metrics.json last: a full disk or a
crash leaves no half-written evaluation that reads as complete, and a report shows only figures
of its own evaluation.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import heapq
import io
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from mtlxray.checkpoint import load_model_from_checkpoint, resolve_checkpoint
from mtlxray.config import dump_config, load_config
from mtlxray.data.audit import overlap
from mtlxray.data.loader import batch_to_device, build_eval_loader, label_names
from mtlxray.data.manifest import Manifest, read_manifest, shard_subsets
from mtlxray.dist import export_torch_env, process_group_kwargs, resolve_world
from mtlxray.errors import (CheckpointError, ConfigError, DataError, MtlxError, ShardError, ShardsNotFoundError,
                            unwrap_worker_error)
from mtlxray.eval import metrics as M
from mtlxray.eval.gate import resolve_gate
from mtlxray.eval.records import RecordCollector, Records, summarise
from mtlxray.hardware import resolve_attention
from mtlxray.io import write_error, write_json_atomic, write_text_atomic
from mtlxray.model import build_model
from mtlxray.preflight import check_image_size
from mtlxray.provenance import provenance
from mtlxray.report import figures
from mtlxray.report.markdown import evaluation_markdown, infection_count
from mtlxray.report.outdir import claim_output_dir

__all__ = ["evaluate_checkpoint", "evaluate_config", "evaluate_model", "default_out_dir", "per_image_csv", "FIGURES",
           "EVALUATE_OUTPUTS"]

logger = logging.getLogger(__name__)

N_CASES = 3
"""Best and worst cases kept for the overlay grid."""
FIGURES = {"Confusion matrix": "confusion.png", "Per-image Dice": "dice_hist.png",
           "Best and worst cases": "overlays.png"}
"""Figure title -> file name under the output folder."""
EVALUATE_OUTPUTS = ("metrics.json", "per_image.csv", "report.md", "config.yaml", *FIGURES.values(), ".partial-*")
"""What evaluate writes under its output folder (and `--overwrite` deletes first): `.partial-*` is
the temp folder of an evaluation killed while writing."""


@dataclass
class Case:
    """An image with its true and predicted masks (uint8 H×W), kept for the overlay figure."""

    key: str
    score: float
    image: np.ndarray
    masks: np.ndarray
    """4×H×W: lung true, infection true, lung predicted, infection predicted."""


class _TopK:
    """The k cases with the highest score seen so far (a min-heap of size k)."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.heap: list[tuple[float, int, Case]] = []
        self.seen = 0  # tie-breaker, so cases themselves are never compared

    def wants(self, score: float) -> bool:
        return len(self.heap) < self.k or score > self.heap[0][0]

    def push(self, score: float, case: Case) -> None:
        self.seen += 1
        if len(self.heap) < self.k:
            heapq.heappush(self.heap, (score, self.seen, case))
        elif score > self.heap[0][0]:
            heapq.heapreplace(self.heap, (score, self.seen, case))

    def cases(self) -> list[Case]:
        return [c for _, _, c in self.heap]


def _to_uint8_image(img: Tensor) -> np.ndarray:
    """1×H×W float image in [0, 1] → H×W uint8."""
    return (img[0].float().clamp(0, 1) * 255).round().byte().cpu().numpy()


def _case_scores(out: dict, batch: dict, by_infection: bool, inf_classes: Tensor) -> Optional[Tensor]:
    """Per-image score the overlay ranks by: infection Dice on positive images (phase 2), else lung Dice."""
    if by_infection and out.get("inf") is not None:
        counts = M.seg_counts(out["inf"] > 0, batch["inf"] > 0.5)
        positive = torch.isin(batch["label"], inf_classes) & batch["has_inf"].bool()
        return torch.where(positive, M.dice(counts), torch.full_like(M.dice(counts), float("nan")))
    if out.get("lung") is not None:
        return M.dice(M.seg_counts(out["lung"] > 0, batch["lung"] > 0.5))
    return None


@torch.no_grad()
def run_model(model, loader, device: torch.device, by_infection: bool, inf_classes: list[int],
              multilabel: bool = False, gate=None) -> tuple[Records, list[Case], list[Case]]:
    """This process's records and its best and worst cases (by infection Dice or lung Dice); class
    probabilities are sigmoids with `multilabel`; with a `gate` (`mtlxray.eval.gate.Gate`) the records
    hold its P(positive class) per image."""
    collector = RecordCollector(multilabel)
    best, worst = _TopK(N_CASES), _TopK(N_CASES)  # worst keeps the highest -score
    classes = torch.as_tensor(inf_classes, device=device)
    try:
        for batch in loader:
            batch = batch_to_device(batch, device)
            out = model(batch["img"])
            collector.add(out, batch, gate.probability(out, batch["img"]) if gate is not None else None)
            scores = _case_scores(out, batch, by_infection, classes)
            if scores is None:
                continue
            zeros = torch.zeros_like(batch["lung"], dtype=torch.bool)
            lung_pred = out["lung"] > 0 if out.get("lung") is not None else zeros
            inf_pred = out["inf"] > 0 if out.get("inf") is not None else zeros
            for i, (key, score) in enumerate(zip(batch["key"], scores.tolist())):
                if score != score or not (best.wants(score) or worst.wants(-score)):  # nan: not scored
                    continue
                masks = torch.stack([batch["lung"][i, 0] > 0.5, batch["inf"][i, 0] > 0.5, lung_pred[i, 0],
                                     inf_pred[i, 0]])  # 4×H×W
                case = Case(str(key), score, _to_uint8_image(batch["img"][i]), masks.byte().cpu().numpy())
                best.push(score, case)
                worst.push(-score, case)
    except Exception as e:  # a loader worker's error arrives wrapped in its traceback
        raise unwrap_worker_error(e) from None
    return collector.records(), best.cases(), worst.cases()


def per_image_csv(summary: dict, records: Records) -> str:
    """One row per image: key, true and predicted class, class probabilities, Dice/IoU, areas."""
    names = summary["class_names"]
    per = summary["per_image"]
    buf = io.StringIO()
    writer = csv.writer(buf)
    extra = [c for c, k in (("gate_p", "gate_p"), ("boxes", "det_boxes")) if k in per]  # gate, box head
    header = ["key", "class", "predicted_class", *(f"p_{n}" for n in names), "lung_dice", "lung_iou",
              "inf_dice", "inf_iou", "lung_area_px", "inf_area_px", *extra]
    writer.writerow(header)
    lung_iou = M.iou(records.lung).tolist() if records.lung is not None else None
    inf_iou = M.iou(records.inf).tolist() if records.inf is not None else None
    for i, key in enumerate(records.keys):
        probs = per["probs"][i] if "probs" in per else [None] * len(names)
        inf_dice = per["inf_dice"][i] if "inf_dice" in per else None
        writer.writerow([
            key, names[records.labels[i]], names[per["predicted"][i]] if "predicted" in per else "",
            *("" if p is None else f"{p:.6f}" for p in probs),
            f"{per['lung_dice'][i]:.6f}" if "lung_dice" in per else "",
            f"{lung_iou[i]:.6f}" if lung_iou else "",
            "" if inf_dice is None else f"{inf_dice:.6f}",
            "" if inf_dice is None or inf_iou is None else f"{inf_iou[i]:.6f}",
            per["lung_area"][i] if "lung_area" in per else "",
            per["inf_area"][i] if "inf_area" in per else "",
            *([f"{per['gate_p'][i]:.6f}"] if "gate_p" in per else []),
            *([json.dumps(per["det_boxes"][i])] if "det_boxes" in per else []),
        ])
    return buf.getvalue()


def _overlay_cases(cases: list[Case], label: str, what: str, with_infection: bool) -> list[figures.OverlayCase]:
    """Overlay rows with error columns; without an infection output its columns are left out."""
    def row(c: Case) -> figures.OverlayCase:
        lung_true, inf_true, lung_pred, inf_pred = c.masks
        if not with_infection:
            inf_true = inf_pred = None
        return figures.OverlayCase(f"{label}: {c.key}", c.image, lung_true, inf_true,
                                   lung_pred, inf_pred, score=c.score, score_name=what)
    return [row(c) for c in cases]


def write_outputs(summary: dict, records: Records, best: list[Case], worst: list[Case], out: Path,
                  report_dir: Optional[Path] = None) -> None:
    """metrics.json, per_image.csv, report.md and the FIGURES under `out`; the report names paths
    relative to `report_dir`, the folder it ends up in (`out` unless written into a staging folder)."""
    out.mkdir(parents=True, exist_ok=True)
    fig = {title: out / name for title, name in FIGURES.items()}
    if summary["confusion"] is not None:
        figures.plot_confusion(np.array(summary["confusion"]), summary["class_names"], fig["Confusion matrix"],
                               f"Confusion matrix: {summary['subset']} subset, {summary['split']} split "
                               f"({int(summary['metrics']['n_images'])} images)")
    hist = {}
    if "lung_dice" in summary["per_image"]:
        hist["lung"] = np.array(summary["per_image"]["lung_dice"])
    if "inf_dice" in summary["per_image"]:
        hist["infection (positives)"] = np.array([d for d in summary["per_image"]["inf_dice"] if d is not None])
    if hist:
        figures.plot_dice_histograms(hist, fig["Per-image Dice"])
    what = summary["ranked_by"]
    if best or worst:  # a classifier has no masks to rank cases by
        with_inf = "inf" in summary.get("tasks", ["inf"]) and summary.get("phase") != "phase1"
        figures.plot_overlay_grid(_overlay_cases(best, "best", what, with_inf) + _overlay_cases(worst, "worst", what, with_inf),
                                  fig["Best and worst cases"], f"Best and worst cases by {what}")
    write_json_atomic(out / "metrics.json", summary, indent=2)
    write_text_atomic(out / "per_image.csv", per_image_csv(summary, records))
    shown = {title: name for title, name in FIGURES.items() if (out / name).is_file()}
    write_text_atomic(out / "report.md", evaluation_markdown(summary, shown, base=report_dir or out))


def publish_outputs(out: Path, write: Callable[[Path], None]) -> None:
    """Run `write(folder)` on a temp folder inside `out`, then move what it wrote into `out`,
    metrics.json last (the file `mtlxray compare` takes for a finished evaluation). A failed write
    (a full disk) removes the temp folder and raises one line naming `out` and its free space."""
    staging = Path(tempfile.mkdtemp(dir=out, prefix=".partial-"))
    try:
        write(staging)
        for path in sorted(staging.iterdir(), key=lambda p: p.name == "metrics.json"):
            os.replace(path, out / path.name)
    except OSError as e:  # matplotlib's and PIL's writes fail with it too
        raise write_error(out, e) from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def default_out_dir(checkpoint: str | Path, ckpt: Path, shards: str | Path, subset: str, split: str) -> Path:
    """`runs/<name>/eval-<checkpoint>-<shards>-<subset>-<split>`: each evaluation keeps its own folder."""
    shards_name = Path(str(shards).rstrip("/")).name or "shards"
    return ckpt.parent.parent / f"eval-{Path(checkpoint).name}-{shards_name}-{subset}-{split}"


def _training_dir(ckpt: Path, cfg) -> Optional[Path]:
    """The working directory a run was trained from, when `ckpt` (resolved) still sits in its run
    folder, `<run.output_dir>/<run.name>/checkpoints/<step>`, with a relative run.output_dir; None
    when that cannot be told. The relative paths of the run's config are relative to it."""
    run = Path(cfg.run.output_dir) / cfg.run.name
    if run.is_absolute() or ckpt.parent.name != "checkpoints":
        return None
    run_dir = ckpt.parent.parent
    if run_dir.parts[-len(run.parts):] != run.parts:
        return None
    return Path(*run_dir.parts[:-len(run.parts)])


def _locate(path: str, base: Optional[Path]) -> str:
    """A path of a checkpoint's config as seen from here: a URL or an absolute path as it is, a
    relative one against the run's training directory `base` (else the working directory)."""
    if "://" in path or Path(path).is_absolute():
        return path
    return str((base or Path.cwd()) / path)


def _training_data(cfg, ckpt: Path, seen: frozenset = frozenset()) -> tuple[list[tuple[str, str, str]], list[str]]:
    """(shards, subset, split) a checkpoint was trained on, following phase.init_from to earlier
    phases, and the training sources that cannot be found (an earlier phase's folder that is gone)."""
    base = _training_dir(ckpt, cfg)
    sets = [(_locate(cfg.data.shards, base), s, cfg.data.train_split) for s in shard_subsets(cfg.data)]
    sets += [(_locate(src.shards or cfg.data.shards, base), src.subset, cfg.data.train_split)
             for src in cfg.data.sources]
    missing: list[str] = []
    if cfg.phase.init_from:
        try:
            earlier = resolve_checkpoint(_locate(cfg.phase.init_from, base))
        except CheckpointError as e:
            return sets, [f"phase.init_from {e}"]
        if earlier not in seen and (earlier / "config.yaml").is_file():
            more, missing = _training_data(load_config(earlier / "config.yaml"), earlier, seen | {earlier})
            sets += more
    return sets, missing


def check_leakage(cfg, shards: str | Path, subset: str, split: str, allow: bool, ckpt: Path) -> dict:
    """The audit of the evaluated split against the training data of checkpoint `ckpt` (docs/data.md,
    "Duplicates and leakage"): DataError when they share an image, or when a training source
    cannot be found (the check would be silently weaker), unless `allow`. Relative paths of the
    checkpoint's config are taken from the run's training directory when the checkpoint sits in
    its run folder. Returns what the report states."""
    pairs, checked, unchecked = [], [], []
    sets, missing = _training_data(cfg, ckpt)
    for train_shards, train_subset, train_split in dict.fromkeys(sets):
        where = f"{train_shards} {train_subset}/{train_split}"
        try:
            pairs += overlap(str(shards), split, train_shards, train_split, subset_a=subset, subset_b=train_subset)
            checked.append(where)
        except ShardsNotFoundError:
            missing.append(f"data.shards {train_shards}: no shard set there")
        except ShardError as e:  # a shard set built before image hashes were recorded
            unchecked.append(f"{where} ({e})")
    missing = list(dict.fromkeys(missing))
    if missing and not allow:
        raise DataError(f"cannot check {shards} {subset}/{split} against the checkpoint's training data: "
                        f"{'; '.join(missing)}; pass --allow-leakage to evaluate without that check")
    result = {"checked_against": checked, "not_checked": unchecked + missing, "overlapping_images": len(pairs),
              "examples": [f"{p.a.key} ~ {p.b.key} ({p.kind})" for p in pairs[:5]], "allowed": allow}
    if pairs and not allow:
        raise DataError(f"{shards} {subset}/{split} shares {len(pairs)} image(s) with the checkpoint's training data "
                        f"(e.g. {result['examples'][0]}): figures on it would be inflated; see `mtlxray shards audit`, "
                        "or pass --allow-leakage to evaluate anyway")
    return result


def _accelerator():
    from accelerate import Accelerator

    world = resolve_world()
    export_torch_env(world)
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[process_group_kwargs(world)])


def default_subset(cfg) -> str:
    """The subset a model is evaluated on by default: `infection` after phase 2, else `lung`."""
    return "infection" if cfg.phase.name == "phase2" else "lung"


def evaluate_checkpoint(checkpoint: str | Path, shards: str | Path, *, split: str = "test",
                        subset: str | None = None, out: str | Path | None = None, batch_size: int = 16,
                        n_boot: int = 1000, seed: int = 0, allow_leakage: bool = False,
                        gate: Optional[dict] = None, overwrite: bool = False) -> dict:
    """Evaluate a checkpoint on a split; every rank returns the summary, rank 0 writes the files.

    `gate`: overrides of the checkpoint's teacher-forcing gate (`source`, `threshold`,
    `first_stage`, as `mtlxray.eval.gate.resolve_gate` takes them); with a gate, metrics come
    gated and ungated. `out`: a folder that must be empty unless `overwrite` (the default folder,
    `default_out_dir`, is replaced).

    Refuses (DataError) a split that shares images with the checkpoint's training data unless
    `allow_leakage`. Runs in one process, or in several under `accelerate launch`/`torchrun`
    (records are gathered)."""
    ckpt = resolve_checkpoint(checkpoint)
    model, cfg = load_model_from_checkpoint(ckpt)
    subset = subset or default_subset(cfg)
    out_dir = Path(out) if out is not None else default_out_dir(checkpoint, ckpt, shards, subset, split)
    return evaluate_model(model, cfg, shards, {"checkpoint": str(ckpt)}, out_dir, split=split, subset=subset,
                          batch_size=batch_size, n_boot=n_boot, seed=seed, allow_leakage=allow_leakage, gate=gate,
                          overwrite=overwrite or out is None)


def evaluate_config(config: str | Path, overrides: list[str], shards: str | Path, *, split: str = "test",
                    subset: str | None = None, out: str | Path | None = None, batch_size: int = 16,
                    n_boot: int = 1000, seed: int = 0, gate: Optional[dict] = None, overwrite: bool = False) -> dict:
    """Evaluate the model a config describes, with the weights its config names and no training run
    (zero-shot CLIP from `model.pretrained`, or any model as initialised).

    The default output folder is `<run.output_dir>/<run.name>/eval-pretrained-<shards>-<subset>-<split>`,
    which `mtlxray compare` reads as that run's evaluation."""
    cfg = load_config(config, overrides)
    model = build_model(cfg.model, pretrained=True)
    model.set_mode(cfg.phase.name)
    model.eval()
    subset = subset or default_subset(cfg)
    overwrite = overwrite or out is None  # the default folder holds this evaluation only
    if out is None:
        shards_name = Path(str(shards).rstrip("/")).name or "shards"
        out = Path(cfg.run.output_dir) / cfg.run.name / f"eval-pretrained-{shards_name}-{subset}-{split}"
    source = {"checkpoint": None, "model_config": str(config), "overrides": list(overrides),
              "weights": cfg.model.pretrained or cfg.model.encoder_pretrained}
    return evaluate_model(model, cfg, shards, source, Path(out), split=split, subset=subset,
                          batch_size=batch_size, n_boot=n_boot, seed=seed, gate=gate, overwrite=overwrite)


def evaluate_model(model, cfg, shards: str | Path, source: dict, out_dir: Path, *, split: str, subset: str,
                   batch_size: int = 16, n_boot: int = 1000, seed: int = 0, allow_leakage: bool = False,
                   gate: Optional[dict] = None, overwrite: bool = False) -> dict:
    """Evaluate `model` (built from `cfg`, in eval mode) on `subset`/`split` of `shards`; every rank
    returns the summary, rank 0 writes metrics.json (with `source`'s fields), per_image.csv,
    report.md, the figures and the resolved config.yaml under `out_dir`, which it holds for the
    whole evaluation and which must be empty unless `overwrite` (see the module docstring).

    Class names are those of the config's label scheme (`data.classes`), which the loader labels by."""
    what = source.get("checkpoint") or source.get("model_config")
    manifest = read_manifest(shards)
    wrong_size = check_image_size(cfg.model, manifest, shards)
    if wrong_size:
        raise ConfigError(f"{what}: {wrong_size[0]}")
    class_names = label_names(cfg.data)
    if "cls" in model.tasks and cfg.model.num_classes != len(class_names):
        raise ConfigError(f"{what}: model.num_classes={cfg.model.num_classes} but data.classes={cfg.data.classes} "
                          f"has {len(class_names)} classes ({', '.join(class_names)})")
    multilabel = cfg.model.cls_loss == "bce_multilabel"
    subset = subset or ("infection" if cfg.phase.name == "phase2" else "lung")
    leakage = check_leakage(cfg, shards, subset, split, allow_leakage, Path(source["checkpoint"])) \
        if source.get("checkpoint") else \
        {"checked_against": [], "not_checked": [], "overlapping_images": 0, "examples": [], "allowed": False,
         "note": "no training run"}
    accelerator = _accelerator()
    with contextlib.ExitStack() as held:
        refusal = None
        if accelerator.is_main_process:
            try:
                held.enter_context(claim_output_dir(out_dir, EVALUATE_OUTPUTS, overwrite=overwrite, command="evaluate"))
            except MtlxError as e:
                refusal = e
        if accelerator.num_processes > 1:  # every rank stops on rank 0's refusal, none waits for it
            from accelerate.utils import broadcast_object_list

            refusal = broadcast_object_list([refusal])[0]
        if refusal is not None:
            raise refusal
        return _evaluate_into(model, cfg, shards, source, out_dir, accelerator, manifest, class_names, leakage,
                              split=split, subset=subset, batch_size=batch_size, n_boot=n_boot, seed=seed,
                              gate=gate, multilabel=multilabel, what=what)


def _evaluate_into(model, cfg, shards, source: dict, out_dir: Path, accelerator, manifest: Manifest, class_names: list,
                   leakage: dict, *, split: str, subset: str, batch_size: int, n_boot: int, seed: int,
                   gate: Optional[dict], multilabel: bool, what: str) -> dict:
    """`evaluate_model`'s work once the output folder is held: run, gather, summarise, write."""
    from accelerate.utils import gather_object

    model.to(accelerator.device)
    model.set_attention(resolve_attention(cfg.model.attention, "fp32", accelerator.device.type))
    expected = manifest.count(subset, split) or 0
    data_cfg = dataclasses.replace(cfg.data, shards=str(shards))
    loader = build_eval_loader(data_cfg, subset=subset, split=split, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, batch_size=batch_size)
    by_infection = model.mode == "phase2" and "inf" in model.tasks and subset == "infection"

    gating = resolve_gate(cfg, accelerator.device, **(gate or {}))
    records, best, worst = run_model(model, loader, accelerator.device, by_infection,
                                     cfg.phase.positive_classes, multilabel, gating)
    records = Records.concat(gather_object([records])).unique_by_key()
    if len(records) != expected:
        raise DataError(f"{shards}: evaluated {len(records)} {subset}/{split} images but the manifest lists "
                        f"{expected}: a shard is truncated or was replaced (rebuild or verify the shards)")
    if not len(records):
        raise DataError(f"{shards}: the {subset}/{split} split has no images")
    best = sorted({c.key: c for c in gather_object(best)}.values(), key=lambda c: -c.score)[:N_CASES]
    shown = {c.key for c in best}  # with few images the lowest may also be among the highest
    worst = sorted({c.key: c for c in gather_object(worst) if c.key not in shown}.values(),
                   key=lambda c: c.score)[:N_CASES]
    summary = summarise(records, class_names, cfg.phase.positive_classes, n_boot=n_boot, seed=seed,
                        multilabel=multilabel, gate_threshold=gating.threshold if gating else 0.5,
                        det_score_threshold=cfg.model.det_score_threshold, det_nms_iou=cfg.model.det_nms_iou,
                        det_max_boxes=cfg.model.det_max_boxes)
    summary.update(source)
    summary.update(provenance(cfg))
    summary.update(model=cfg.model.name, tasks=sorted(model.tasks), shards=str(shards), subset=subset, split=split,
                   bootstrap=n_boot, world_size=accelerator.num_processes, phase=cfg.phase.name,
                   ranked_by="infection Dice" if by_infection else "lung Dice",
                   infection_classes=[class_names[c] for c in cfg.phase.positive_classes], leakage=leakage,
                   gate=gating.describe() if gating else None)
    if accelerator.is_main_process:
        def write(folder: Path) -> None:
            write_text_atomic(folder / "config.yaml", dump_config(cfg))
            write_outputs(summary, records, best, worst, folder, report_dir=out_dir)

        publish_outputs(out_dir, write)
        logger.info("evaluation of %s on %s/%s (%d images) -> %s", what, subset, split, len(records), out_dir)
    accelerator.wait_for_everyone()
    summary["out"] = str(out_dir)
    return summary


def headline(summary: dict) -> str:
    """The one-paragraph result `mtlxray evaluate` prints."""
    m = summary["metrics"]
    tasks = summary.get("tasks", ["lung", "inf", "cls"])
    parts = [f"{int(m['n_images'])} images"]
    if "lung_dice" in m:
        parts.append(f"lung Dice {m['lung_dice']:.4f}")
    elif "lung" not in tasks:
        parts.append("no segmentation metrics (the model has no mask output)")
    if "inf_dice" in m:
        parts.append(f"infection Dice {m['inf_dice']:.4f} ({infection_count(m, '/'.join(summary['infection_classes']))}"
                     f"), infection on negatives {100 * m['inf_fp_share']:.1f}% of "
                     f"{int(m['inf_negatives_n'])} images")
    elif "inf" in tasks:
        parts.append("no infection metrics (the model has no infection head in "
                     f"{summary['phase']})")
    if "accuracy" in m:
        parts.append(f"accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}, macro AUC {m['auc_macro']:.4f}")
        if "f1_at_0.5_macro" in m:
            parts.append(f"macro F1 at 0.5 (multi-label) {m['f1_at_0.5_macro']:.4f}")
    elif "cls" not in tasks:
        parts.append("no class metrics (the model has no class output)")
    if "det_map" in m:
        parts.append(f"boxes mAP@0.5 {m['det_map_50']:.4f}, mAP@[.5:.95] {m['det_map']:.4f}, boxes on negatives "
                     f"{100 * m['det_fp_share']:.1f}%")
    if "gate_sensitivity" in m:
        gated = [f"gate sensitivity {m['gate_sensitivity']:.4f}, specificity {m['gate_specificity']:.4f}"]
        if "inf_dice_gated" in m:
            gated.append(f"infection Dice {m['inf_dice_gated']:.4f}, infection on negatives "
                         f"{100 * m['inf_fp_share_gated']:.1f}%")
        if "det_map_gated" in m:
            gated.append(f"boxes mAP@0.5 {m['det_map_50_gated']:.4f}, boxes on negatives "
                         f"{100 * m['det_fp_share_gated']:.1f}%")
        parts.append("gated: " + ", ".join(gated))
    return ", ".join(parts)

"""`mtlxray evaluate`: every metric of a checkpoint on a shard split, with intervals, figures and a report.

Each process runs the model on its contiguous share of the split and keeps per-image records
(`mtlxray.evaluation.RecordCollector`) and a few best/worst cases for the overlay figure; the
records are gathered once, de-duplicated by sample key, and checked against the manifest's count
(every image is seen exactly once). `mtlxray.evaluation.summarise` computes the metrics under the
names training logs them with; rank 0 writes metrics.json, per_image.csv, report.md and figures.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import heapq
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import torch
from torch import Tensor

from mtlxray import CLASS_NAMES
from mtlxray import metrics as M
from mtlxray.errors import ConfigError, DataError, unwrap_worker_error
from mtlxray.evaluation import RecordCollector, Records, summarise
from mtlxray.hardware import resolve_attention
from mtlxray.io import write_json_atomic, write_text_atomic
from mtlxray.report import figures
from mtlxray.report.markdown import evaluation_markdown

__all__ = ["evaluate_checkpoint", "default_out_dir", "per_image_csv", "FIGURES", "cli_main"]

logger = logging.getLogger(__name__)

N_CASES = 3
"""Best and worst cases kept for the overlay grid."""
FIGURES = {"Confusion matrix": "confusion.png", "Per-image Dice": "dice_hist.png",
           "Best and worst cases": "overlays.png"}
"""Figure title -> file name under the output folder."""


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
def run_model(model, loader, device: torch.device, by_infection: bool,
              inf_classes: list[int]) -> tuple[Records, list[Case], list[Case]]:
    """This process's records and its best and worst cases (by infection Dice or lung Dice)."""
    from mtlxray.data.loader import batch_to_device

    collector = RecordCollector()
    best, worst = _TopK(N_CASES), _TopK(N_CASES)  # worst keeps the highest -score
    classes = torch.as_tensor(inf_classes, device=device)
    try:
        for batch in loader:
            batch = batch_to_device(batch, device)
            out = model(batch["img"])
            collector.add(out, batch)
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
    header = ["key", "class", "predicted_class", *(f"p_{n}" for n in names), "lung_dice", "lung_iou",
              "inf_dice", "inf_iou", "lung_area_px", "inf_area_px"]
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
        ])
    return buf.getvalue()


def _overlay_cases(cases: list[Case], label: str, what: str) -> list[figures.OverlayCase]:
    return [figures.OverlayCase(f"{label}, {what} {c.score:.3f}\n{c.key}", c.image, *c.masks) for c in cases]


def write_outputs(summary: dict, records: Records, best: list[Case], worst: list[Case], out: Path) -> None:
    """metrics.json, per_image.csv, report.md and the FIGURES under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    fig = {title: out / name for title, name in FIGURES.items()}
    if summary["confusion"] is not None:
        figures.plot_confusion(np.array(summary["confusion"]), summary["class_names"], fig["Confusion matrix"])
    hist = {}
    if "lung_dice" in summary["per_image"]:
        hist["lung"] = np.array(summary["per_image"]["lung_dice"])
    if "inf_dice" in summary["per_image"]:
        hist["infection (positives)"] = np.array([d for d in summary["per_image"]["inf_dice"] if d is not None])
    if hist:
        figures.plot_dice_histograms(hist, fig["Per-image Dice"])
    what = summary["ranked_by"]
    figures.plot_overlay_grid(_overlay_cases(best, "best", what) + _overlay_cases(worst, "worst", what),
                              fig["Best and worst cases"], f"Best and worst cases by {what}")
    write_json_atomic(out / "metrics.json", summary, indent=2)
    write_text_atomic(out / "per_image.csv", per_image_csv(summary, records))
    shown = {title: name for title, name in FIGURES.items() if (out / name).is_file()}
    write_text_atomic(out / "report.md", evaluation_markdown(summary, shown))


def default_out_dir(checkpoint: str | Path, ckpt: Path, shards: str | Path, subset: str, split: str) -> Path:
    """`runs/<name>/eval-<checkpoint>-<shards>-<subset>-<split>`: each evaluation keeps its own folder."""
    shards_name = Path(str(shards).rstrip("/")).name or "shards"
    return ckpt.parent.parent / f"eval-{Path(checkpoint).name}-{shards_name}-{subset}-{split}"


def _accelerator():
    from accelerate import Accelerator

    from mtlxray.dist import export_torch_env, process_group_kwargs, resolve_world

    world = resolve_world()
    export_torch_env(world)
    return Accelerator(cpu=not torch.cuda.is_available(), kwargs_handlers=[process_group_kwargs(world)])


def evaluate_checkpoint(checkpoint: str | Path, shards: str | Path, *, split: str = "test",
                        subset: str | None = None, out: str | Path | None = None, batch_size: int = 16,
                        n_boot: int = 1000, seed: int = 0) -> dict:
    """Evaluate a checkpoint on a split; every rank returns the summary, rank 0 writes the files.

    Runs in one process, or in several under `accelerate launch`/`torchrun` (records are gathered)."""
    from accelerate.utils import gather_object

    from mtlxray.checkpoint import load_model_from_checkpoint, resolve_checkpoint
    from mtlxray.data.loader import build_eval_loader, read_manifest

    ckpt = resolve_checkpoint(checkpoint)
    model, cfg = load_model_from_checkpoint(ckpt)
    manifest = read_manifest(shards)
    if manifest.get("image_size") != cfg.model.img_size:
        raise ConfigError(f"{ckpt} is a {cfg.model.img_size}² model but the shards in {shards} hold "
                          f"{manifest.get('image_size')}² images: evaluate on shards built with "
                          f"`--image-size {cfg.model.img_size}`")
    accelerator = _accelerator()
    model.to(accelerator.device)
    model.set_attention(resolve_attention(cfg.model.attention, "fp32", accelerator.device.type))
    subset = subset or ("infection" if cfg.phase.name == "phase2" else "lung")
    expected = sum(manifest["counts"].get(subset, {}).get(split, {}).values())
    data_cfg = dataclasses.replace(cfg.data, shards=str(shards))
    loader = build_eval_loader(data_cfg, subset=subset, split=split, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, batch_size=batch_size)
    by_infection = model.mode == "phase2" and "inf" in model.tasks
    records, best, worst = run_model(model, loader, accelerator.device, by_infection,
                                     cfg.phase.infection_classes)
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
    summary = summarise(records, CLASS_NAMES, cfg.phase.infection_classes, n_boot=n_boot, seed=seed)
    summary.update(checkpoint=str(ckpt), shards=str(shards), subset=subset, split=split, bootstrap=n_boot,
                   world_size=accelerator.num_processes, phase=cfg.phase.name,
                   ranked_by="infection Dice" if by_infection else "lung Dice",
                   infection_classes=[CLASS_NAMES[c] for c in cfg.phase.infection_classes])
    out_dir = Path(out) if out is not None else default_out_dir(checkpoint, ckpt, shards, subset, split)
    if accelerator.is_main_process:
        write_outputs(summary, records, best, worst, out_dir)
        logger.info("evaluation of %s on %s/%s (%d images) -> %s", ckpt, subset, split, len(records), out_dir)
    accelerator.wait_for_everyone()
    summary["out"] = str(out_dir)
    return summary


def headline(summary: dict) -> str:
    """The one-paragraph result `mtlxray evaluate` prints."""
    m = summary["metrics"]
    parts = [f"{int(m['n_images'])} images"]
    if "lung_dice" in m:
        parts.append(f"lung Dice {m['lung_dice']:.4f}")
    if "inf_dice" in m:
        parts.append(f"infection Dice {m['inf_dice']:.4f} ({int(m['inf_n'])} {'/'.join(summary['infection_classes'])} "
                     f"images), infection on negatives {100 * m['inf_fp_share']:.1f}% of "
                     f"{int(m['inf_negatives_n'])} images")
    else:
        parts.append("no infection metrics (the model has no infection head in "
                     f"{summary['phase']})")
    if "accuracy" in m:
        parts.append(f"accuracy {m['accuracy']:.4f}, macro F1 {m['f1_macro']:.4f}")
    return ", ".join(parts)


def cli_main(args: argparse.Namespace) -> int:
    summary = evaluate_checkpoint(args.checkpoint, args.shards, split=args.split, subset=args.subset,
                                  out=args.out, batch_size=args.batch_size, n_boot=args.bootstrap)
    from mtlxray.dist import is_main_process

    if is_main_process():
        print(headline(summary))
        out = Path(summary["out"])
        print(f"wrote {out / 'metrics.json'}, {out / 'per_image.csv'} and {out / 'report.md'}")
    return 0

"""`mtlxray evaluate`: segmentation and classification metrics of a checkpoint on a shard split.

Each process runs the model on its share of the split and keeps only small per-image records
(confusion counts, label, class probabilities) plus a few best/worst cases for the overlay figure;
the records are gathered to every rank and de-duplicated by sample key, every rank computes the
same summary, and rank 0 writes metrics.json, report.md and the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import heapq
import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from mtlxray import CLASS_NAMES
from mtlxray.data.loader import batch_to_device
from mtlxray.errors import DataError
from mtlxray.report import figures
from mtlxray.report.markdown import evaluation_markdown, write_text_atomic
from mtlxray import metrics as M

logger = logging.getLogger(__name__)

COVID_LABEL = CLASS_NAMES.index("COVID-19")
N_CASES = 3
"""Best and worst cases kept for the overlay grid."""
FIGURES = {"Confusion matrix": "confusion.png", "Per-image Dice": "dice_hist.png",
           "Best and worst lung Dice": "overlays.png"}
"""Figure title -> file name under the output folder."""


@dataclass
class ImageRecord:
    """What one evaluated image contributes to the metrics."""

    key: str
    label: int
    probs: list[float]
    lung: list[int]
    """(tp, fp, fn, tn) of the lung mask."""
    inf: list[int]
    has_inf: bool


@dataclass
class Case:
    """An image with its true and predicted masks (uint8 H×W), kept for the overlay figure."""

    key: str
    dice: float
    image: np.ndarray
    masks: np.ndarray
    """4×H×W: lung true, infection true, lung predicted, infection predicted."""


def _to_uint8_image(img: Tensor) -> np.ndarray:
    """1×H×W float image (any normalisation) → H×W uint8, min-max stretched for display."""
    x = img[0].float()
    x = (x - x.min()) / (x.max() - x.min()).clamp_min(1e-6)
    return (x * 255).round().byte().cpu().numpy()


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


@torch.no_grad()
def run_model(model, loader, device: torch.device) -> tuple[list[ImageRecord], list[Case], list[Case]]:
    """Per-image records of this process's share, and its best and worst lung-Dice cases."""
    records: list[ImageRecord] = []
    best, worst = _TopK(N_CASES), _TopK(N_CASES)  # worst keeps the highest -dice
    for batch in loader:
        batch = batch_to_device(batch, device)
        img = batch["img"]
        out = model(img)
        lung_pred = out["lung"] > 0  # B×1×H×W; logit > 0 is probability > 0.5
        # A phase-1 model has no infection output: its images then count for no infection metric.
        has_inf_out = out["inf"] is not None
        inf_pred = out["inf"] > 0 if has_inf_out else torch.zeros_like(lung_pred)
        lung_true = batch["lung"] > 0.5
        inf_true = batch["inf"] > 0.5
        lung_c = M.seg_counts(lung_pred, lung_true)  # B×4
        inf_c = M.seg_counts(inf_pred, inf_true)
        probs = torch.softmax(out["cls"].float(), dim=1)  # B×C
        lung_dice = M.dice(lung_c)  # B
        for i, key in enumerate(batch["key"]):
            records.append(ImageRecord(
                key=str(key), label=int(batch["label"][i]), probs=probs[i].tolist(), lung=lung_c[i].tolist(),
                inf=inf_c[i].tolist(), has_inf=has_inf_out and bool(batch["has_inf"][i]),
            ))
            d = float(lung_dice[i])
            if not (best.wants(d) or worst.wants(-d)):
                continue
            masks = torch.stack([lung_true[i, 0], inf_true[i, 0], lung_pred[i, 0], inf_pred[i, 0]])  # 4×H×W
            case = Case(str(key), d, _to_uint8_image(img[i]), masks.byte().cpu().numpy())
            best.push(d, case)
            worst.push(-d, case)
    return records, best.cases(), worst.cases()


def _dedupe(records: list[ImageRecord]) -> list[ImageRecord]:
    """One record per sample key, in key order (a sampler may pad a rank with repeats)."""
    by_key = {r.key: r for r in records}
    return [by_key[k] for k in sorted(by_key)]


def summarise(records: list[ImageRecord], n_boot: int, seed: int = 0) -> dict:
    """Every metric of the report from per-image records, with bootstrap CIs for the headline ones."""
    if not records:
        raise DataError("evaluate: the split has no images")
    names = list(CLASS_NAMES)
    labels = torch.tensor([r.label for r in records])
    probs = torch.tensor([r.probs for r in records], dtype=torch.float64)
    preds = probs.argmax(1)
    lung = torch.tensor([r.lung for r in records], dtype=torch.long)
    inf_rows = [r.inf for r in records if r.has_inf and r.label == COVID_LABEL]
    inf = torch.tensor(inf_rows, dtype=torch.long).reshape(-1, 4)

    confusion = M.confusion_matrix(preds, labels, len(names))
    cls = M.classification_summary(confusion, names)
    auc = M.roc_auc_ovr(probs, labels)
    cls.update({f"auc/{n}": a for n, a in zip(names, auc)})
    finite = [a for a in auc if not math.isnan(a)]
    cls["auc_macro"] = float(np.mean(finite)) if finite else math.nan

    lung_dice, inf_dice = M.dice(lung), M.dice(inf)

    def macro_auc(idx: Tensor) -> float:
        vals = [a for a in M.roc_auc_ovr(probs[idx], labels[idx]) if not math.isnan(a)]
        return float(np.mean(vals)) if vals else math.nan

    def macro_f1(idx: Tensor) -> float:
        return M.classification_summary(M.confusion_matrix(preds[idx], labels[idx], len(names)), names)["f1_macro"]

    n = len(records)
    ci = {
        "lung_dice": M.bootstrap_ci(lambda idx: lung_dice[idx].mean().item(), n, n_boot, seed),
        "inf_dice": M.bootstrap_ci(lambda idx: inf_dice[idx].mean().item(), len(inf_dice), n_boot, seed),
        "accuracy": M.bootstrap_ci(lambda idx: (preds[idx] == labels[idx]).double().mean().item(), n, n_boot, seed),
        "f1_macro": M.bootstrap_ci(macro_f1, n, n_boot, seed),
        "auc_macro": M.bootstrap_ci(macro_auc, n, n_boot, seed),
    }
    return {
        "n_images": n,
        "class_names": names,
        "class_counts": torch.bincount(labels, minlength=len(names)).tolist(),
        "lung": {**M.seg_summary(lung, ""), "n_images": n},
        "infection": {**M.seg_summary(inf, ""), "n_images": len(inf_rows),
                      "note": "COVID-19 images with an infection mask only"},
        "classification": cls,
        "confusion": confusion.tolist(),
        "ci95": {k: list(v) for k, v in ci.items()},
        "bootstrap": n_boot,
        "per_image": {"lung_dice": lung_dice.tolist(), "inf_dice": inf_dice.tolist()},
    }


def _json_safe(x):
    """nan/inf → None so that metrics.json is strict JSON."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def _overlay_cases(cases: list[Case], label: str) -> list[figures.OverlayCase]:
    return [figures.OverlayCase(f"{label}, lung Dice {c.dice:.3f}\n{c.key}", c.image, *c.masks) for c in cases]


def write_outputs(summary: dict, best: list[Case], worst: list[Case], out: Path) -> None:
    """metrics.json, report.md and the FIGURES under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    fig = {title: out / name for title, name in FIGURES.items()}
    figures.plot_confusion(np.array(summary["confusion"]), summary["class_names"], fig["Confusion matrix"])
    figures.plot_dice_histograms({"lung": np.array(summary["per_image"]["lung_dice"]),
                                  "infection (COVID-19)": np.array(summary["per_image"]["inf_dice"])},
                                 fig["Per-image Dice"])
    figures.plot_overlay_grid(_overlay_cases(best, "best") + _overlay_cases(worst, "worst"),
                              fig["Best and worst lung Dice"], "Best and worst cases by lung Dice")
    write_text_atomic(out / "metrics.json", json.dumps(_json_safe(summary), indent=2) + "\n")
    write_text_atomic(out / "report.md", evaluation_markdown(summary, FIGURES))


def evaluate_checkpoint(checkpoint: str | Path, shards: str | Path, *, split: str = "test",
                        subset: str | None = None, out: str | Path | None = None, batch_size: int = 16,
                        n_boot: int = 1000, seed: int = 0) -> dict:
    """Evaluate a checkpoint on a split; every rank returns the summary, rank 0 writes the files.

    Runs in one process, or in several under `accelerate launch`/`torchrun` (records are gathered).
    """
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs, gather_object

    from mtlxray.data.loader import build_eval_loader
    from mtlxray.checkpoint import load_model_from_checkpoint, resolve_checkpoint
    from mtlxray.dist import export_torch_env, pg_timeout, resolve_world

    ckpt = resolve_checkpoint(checkpoint)
    world = resolve_world()
    export_torch_env(world)
    on_gpu = torch.cuda.is_available()
    # Naming a backend makes accelerate build a process group, so name gloo only for several CPU ranks.
    backend = "gloo" if world.world_size > 1 and not on_gpu else None
    accelerator = Accelerator(cpu=not on_gpu, kwargs_handlers=[
        InitProcessGroupKwargs(backend=backend, timeout=pg_timeout())])
    model, cfg = load_model_from_checkpoint(ckpt)
    model.to(accelerator.device)
    subset = subset or ("infection" if cfg.phase.name == "phase2" else "lung")
    data_cfg = dataclasses.replace(cfg.data, shards=str(shards))
    loader = build_eval_loader(data_cfg, subset=subset, split=split, rank=accelerator.process_index,
                               world_size=accelerator.num_processes, batch_size=batch_size)
    records, best, worst = run_model(model, loader, accelerator.device)
    records = _dedupe(gather_object(records))
    best = sorted({c.key: c for c in gather_object(best)}.values(), key=lambda c: -c.dice)[:N_CASES]
    shown = {c.key for c in best}  # with few images the lowest may also be among the highest
    worst = sorted({c.key: c for c in gather_object(worst) if c.key not in shown}.values(),
                   key=lambda c: c.dice)[:N_CASES]
    summary = summarise(records, n_boot, seed)
    summary.update(checkpoint=str(ckpt), shards=str(shards), subset=subset, split=split,
                   world_size=accelerator.num_processes)
    out_dir = Path(out) if out is not None else ckpt.parent.parent / f"eval-{subset}-{split}"
    if accelerator.is_main_process:
        write_outputs(summary, best, worst, out_dir)
        logger.info("evaluation of %s on %s/%s (%d images) -> %s", ckpt, subset, split,
                    summary["n_images"], out_dir)
    accelerator.wait_for_everyone()
    summary["out"] = str(out_dir)
    return summary


def cli_main(args: argparse.Namespace) -> int:
    summary = evaluate_checkpoint(args.checkpoint, args.shards, split=args.split, subset=args.subset,
                                  out=args.out, batch_size=args.batch_size, n_boot=args.bootstrap)
    import accelerate

    if accelerate.PartialState().is_main_process:
        c, lung = summary["classification"], summary["lung"]
        print(f"{summary['n_images']} images: lung Dice {lung['dice']:.4f}, infection Dice "
              f"{summary['infection']['dice']:.4f} ({summary['infection']['n_images']} COVID-19 images), "
              f"accuracy {c['accuracy']:.4f}, macro F1 {c['f1_macro']:.4f}")
        print(f"wrote {Path(summary['out']) / 'metrics.json'} and {Path(summary['out']) / 'report.md'}")
    return 0

"""Validation during training: the model on the validation split, summarised by `mtlxray.eval.records`.

Each rank evaluates its contiguous share of the split (every image once across ranks). Ranks may
hold unequal numbers of batches; they step in lockstep (a rank that ran out repeats a blank
forward and discards it) so that ZeRO-3's collectives line up. Records are gathered once at the
end. The validation loss is averaged over images.

With `overlays` > 0 the main process also keeps its first few images with their true and predicted
masks (from the forward pass it runs anyway), drawn by `mtlxray.overlays` for TensorBoard.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Optional

import numpy as np
import torch

from mtlxray.config import Config
from mtlxray.data.loader import batch_to_device, build_eval_loader, label_names
from mtlxray.data.manifest import validation_subset
from mtlxray.errors import unwrap_worker_error
from mtlxray.eval.records import RecordCollector, Records, summarise
from mtlxray.overlays import overlay_row
from mtlxray.train.losses import phase_loss
from mtlxray.train.signals import agree

__all__ = ["Validator", "VAL_OVERLAYS", "iterate_keeping_rng", "overlay_rows"]

VAL_OVERLAYS = 4
"""Validation images a run with TensorBoard shows at each evaluation (`Validator.overlays`)."""


def iterate_keeping_rng(loader) -> Iterator[dict]:
    """Iterate `loader` without touching the global torch RNG, re-raising worker errors in one line.

    A DataLoader draws its workers' base seed from the global RNG, and an in-process pipeline may
    draw when it starts. A resumed run starts its loader at a different point than an
    uninterrupted one, so such draws would shift every later random number of the model
    (stochastic depth) and break exact resume. The data pipeline seeds itself.
    """
    try:
        with torch.random.fork_rng(devices=[]):
            it = iter(loader)
        while True:
            with torch.random.fork_rng(devices=[]):
                batch = next(it, None)
            if batch is None:
                return
            yield batch
    except Exception as e:  # a loader worker re-raises with its whole traceback in the message
        raise unwrap_worker_error(e) from None


class Validator:
    """Runs validation for a Trainer; returns `val/<metric>` values.

    With a `gate` (`mtlxray.eval.gate.Gate`, the phase's teacher-forcing gate) the metrics come
    gated and ungated; the validation loss always selects positives by the ground truth.

    With `overlays` > 0, `image` holds after each run the main process's first `overlays`
    validation images, one per row of image | true masks | predicted masks (N·H×3W×3 uint8), else None."""

    def __init__(self, cfg: Config, accelerator, model, gate=None, overlays: int = 0) -> None:
        self.cfg, self.accelerator, self.model, self.gate = cfg, accelerator, model, gate
        self.overlays = overlays if accelerator.is_main_process else 0
        self.image: Optional[np.ndarray] = None

    @torch.no_grad()
    def run(self) -> dict[str, float]:
        from accelerate.utils import gather_object

        acc, cfg = self.accelerator, self.cfg
        loader = build_eval_loader(cfg.data, subset=validation_subset(cfg.data), split=cfg.data.val_split,
                                   rank=acc.process_index, world_size=acc.num_processes)
        self.model.eval()
        multilabel = cfg.model.cls_loss == "bce_multilabel"
        collector = RecordCollector(multilabel)
        loss_sums: dict[str, torch.Tensor] = {}
        n_local = 0
        kept: list[np.ndarray] = []
        it, last = iterate_keeping_rng(loader), None
        try:
            while True:
                batch = next(it, None)
                if not agree(acc, batch is not None)[0]:
                    break
                if batch is None and last is None:
                    size = cfg.model.img_size
                    last = {"img": torch.zeros(1, 1, size, size, device=acc.device)}
                batch = batch_to_device(batch, acc.device) if batch is not None else None
                out = self.model((batch or last)["img"])
                if batch is None:
                    continue
                last = batch
                collector.add(out, batch, self.gate.probability(out, batch["img"]) if self.gate else None)
                if len(kept) < self.overlays:
                    kept += overlay_rows(out, batch, self.overlays - len(kept))
                n = batch["img"].shape[0]
                loss, parts = phase_loss(out, batch, cfg.phase, cfg.model.cls_loss,
                                         kbox_confidence=cfg.model.det_kbox_confidence)
                for k, v in {"loss": loss, **{f"loss/{t}": p for t, p in parts.items()}}.items():
                    loss_sums[k] = loss_sums.get(k, 0.0) + v.detach().double() * n
                n_local += n
        finally:
            self.model.train()
        self.image = np.concatenate(kept) if kept else None
        local = (collector.records(), {k: v.item() for k, v in loss_sums.items()}, n_local)
        gathered = gather_object([local])
        records = Records.concat([g[0] for g in gathered]).unique_by_key()
        n = sum(g[2] for g in gathered)
        m = cfg.model
        summary = summarise(records, label_names(cfg.data), cfg.phase.positive_classes, multilabel=multilabel,
                            gate_threshold=self.gate.threshold if self.gate else 0.5,
                            det_score_threshold=m.det_score_threshold, det_nms_iou=m.det_nms_iou,
                            det_max_boxes=m.det_max_boxes)
        values = {f"val/{k}": v for k, v in summary["metrics"].items()}
        for key in gathered[0][1] if gathered else {}:
            values[f"val/{key}"] = sum(g[1].get(key, 0.0) for g in gathered) / max(1, n)
        return values


def overlay_rows(out: dict, batch: dict, n: int) -> list[np.ndarray]:
    """The batch's first `n` images as `mtlxray.overlays.overlay_row`s: the true masks (infection
    where annotated) and the model's (logit > 0) for the heads it has."""
    k = min(n, batch["img"].shape[0])

    def masks(t: Optional[torch.Tensor], threshold: float) -> list:
        return [None] * k if t is None else list(t[:k, 0].detach().float().cpu().numpy() > threshold)

    images = (batch["img"][:k, 0].detach().float().clamp(0, 1) * 255).round().byte().cpu().numpy()
    annotated = batch["has_inf"][:k].bool().tolist()
    lung_true, inf_true = masks(batch["lung"], 0.5), masks(batch["inf"], 0.5)
    lung_pred, inf_pred = masks(out.get("lung"), 0.0), masks(out.get("inf"), 0.0)
    return [overlay_row(images[i], lung_true[i], inf_true[i] if annotated[i] else None, lung_pred[i], inf_pred[i])
            for i in range(k)]

"""The gate before the infection and box heads: P(positive class) from the class head or a first-stage classifier.

MultiCheXNet lets a classifier, trained first and then frozen, filter out negative images before
its segmentation and detection heads report anything. `Gate` gives each image P(positive) -
the softmax mass of `phase.positive_classes` (or, for a multi-label head, their largest sigmoid) -
from the model's own class head (`cls_head`, read from the same forward pass, so the encoder runs
once) or from a frozen first-stage classifier (`FirstStage`, any checkpoint with a class output,
`model.first_stage`), and passes the image when that probability reaches the threshold
(`phase.teacher_forcing.threshold`).

Training uses it through `mtlxray.train.teacher_forcing` (teacher forcing), validation and `mtlxray
evaluate` to report gated beside ungated figures (`mtlxray.eval.records`), and `mtlxray predict` to
decide whether infection and boxes are reported.
"""

from __future__ import annotations

import logging
from typing import Optional, Sequence

import torch
from torch import Tensor

from mtlxray.checkpoint import load_model_from_checkpoint, resolve_checkpoint
from mtlxray.config import Config
from mtlxray.errors import ConfigError
from mtlxray.hardware import resolve_attention

__all__ = ["positive_probability", "ground_truth", "FirstStage", "Gate", "resolve_gate"]

logger = logging.getLogger(__name__)


def positive_probability(logits: Tensor, classes: Sequence[int], multilabel: bool = False) -> Tensor:
    """B×C class logits -> B probabilities of a positive class: the softmax mass of `classes`, or
    for a multi-label (sigmoid) head the largest of their sigmoids. fp32, no gradient."""
    logits = logits.detach().float()
    idx = torch.as_tensor(list(classes), device=logits.device)
    if multilabel:
        return torch.sigmoid(logits).index_select(1, idx).amax(1)
    return torch.softmax(logits, dim=1).index_select(1, idx).sum(1)


def ground_truth(labels: Tensor, classes: Sequence[int]) -> Tensor:
    """B bool: the label is a positive class."""
    return torch.isin(labels, torch.as_tensor(list(classes), device=labels.device))


class FirstStage:
    """A frozen classifier from a checkpoint (`model.first_stage`): its class logits, never trained.

    Any mtlxray checkpoint whose model has a class output (a Swin-UNet of an earlier phase, a timm
    classifier, `mtl_unet`, ...). It is kept outside the trained model: its weights are neither
    optimised nor saved with the run's checkpoints, and every rank runs it on every step."""

    def __init__(self, checkpoint: str, device: torch.device | str, num_classes: int, precision: str = "fp32") -> None:
        device = torch.device(device)
        try:
            path = resolve_checkpoint(checkpoint)
        except Exception as e:
            raise ConfigError(f"model.first_stage: {e} (train the classifier first)") from None
        model, cfg = load_model_from_checkpoint(path)
        if "cls" not in model.tasks:
            raise ConfigError(f"model.first_stage: {path} holds a {cfg.model.name} without a class output")
        if cfg.model.num_classes != num_classes:
            raise ConfigError(f"model.first_stage: {path} has {cfg.model.num_classes} classes, the model "
                              f"{num_classes}: the gate must classify into the same labels")
        model.requires_grad_(False)
        model.to(device).float().eval()
        model.set_attention(resolve_attention(cfg.model.attention, precision, device.type))
        self.model, self.path, self.device = model, path, device
        self.multilabel = cfg.model.cls_loss == "bce_multilabel"
        self.autocast = precision == "bf16"
        logger.info("first-stage classifier: %s (%s, frozen)", path, cfg.model.name)

    @torch.no_grad()
    def logits(self, img: Tensor) -> Tensor:
        """B×C class logits of a B×1×H×W batch in [0, 1], in eval mode."""
        with torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.autocast):
            return self.model(img)["cls"].float()


class Gate:
    """P(positive) per image and the pass decision, from the class head or a first-stage classifier."""

    def __init__(self, source: str, classes: Sequence[int], threshold: float, *, multilabel: bool = False,
                 first_stage: Optional[FirstStage] = None) -> None:
        if source not in ("cls_head", "first_stage"):
            raise ConfigError(f"gate must be cls_head or first_stage, got {source!r}")
        if source == "first_stage" and first_stage is None:
            raise ConfigError("the first_stage gate needs model.first_stage (a classification checkpoint)")
        self.source, self.classes, self.threshold = source, list(classes), threshold
        self.multilabel, self.first_stage = multilabel, first_stage

    @classmethod
    def from_config(cls, cfg: Config, device: torch.device | str, *, source: Optional[str] = None,
                    threshold: Optional[float] = None, first_stage: Optional[str] = None,
                    precision: str = "fp32") -> Optional["Gate"]:
        """The gate of `cfg.phase.teacher_forcing` (None for `gate: none`); `source`, `threshold`
        and `first_stage` override the config's (evaluate/predict flags; source `none` disables)."""
        tf = cfg.phase.teacher_forcing
        source = source or tf.gate
        if source == "none":
            return None
        ckpt = first_stage or cfg.model.first_stage
        stage = None
        if source == "first_stage":
            if not ckpt:
                raise ConfigError("the first_stage gate needs a classification checkpoint: model.first_stage "
                                  "(or --first-stage)")
            stage = FirstStage(ckpt, device, cfg.model.num_classes, precision)
        return cls(source, cfg.phase.positive_classes, tf.threshold if threshold is None else threshold,
                   multilabel=stage.multilabel if stage else cfg.model.cls_loss == "bce_multilabel",
                   first_stage=stage)

    def probability(self, out: dict, img: Tensor) -> Tensor:
        """B float P(positive class): from `out["cls"]` (cls_head) or the first stage run on `img`."""
        if self.source == "first_stage":
            logits = self.first_stage.logits(img)
        else:
            if out.get("cls") is None:
                raise ConfigError("phase.teacher_forcing.gate=cls_head: the model has no class output; "
                                  "use gate: first_stage with model.first_stage")
            logits = out["cls"]
        return positive_probability(logits, self.classes, self.multilabel)

    def passes(self, out: dict, img: Tensor) -> Tensor:
        """B bool: the gate lets the image through to the infection and box heads."""
        return self.probability(out, img) >= self.threshold

    def describe(self) -> str:
        where = f"first stage {self.first_stage.path}" if self.first_stage else "the class head"
        return f"P(classes {self.classes}) >= {self.threshold:g} under {where}"


def resolve_gate(cfg: Config, device: torch.device | str = "cpu", *, threshold: Optional[float] = None,
                 source: Optional[str] = None, first_stage: Optional[str] = None) -> Optional[Gate]:
    """The gate of `evaluate` and `predict`: the checkpoint's `phase.teacher_forcing` gate, with `threshold` (the
    class head when the config has no gate), `source` and `first_stage` overriding it; None for no gate."""
    if source is None and threshold is not None and cfg.phase.teacher_forcing.gate == "none":
        source = "cls_head"  # --gate P alone: the class head
    return Gate.from_config(cfg, device, source=source, threshold=threshold, first_stage=first_stage)

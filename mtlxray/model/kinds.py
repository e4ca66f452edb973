"""What a configured model produces and takes, known from its config alone (no model is built).

The run checks (`mtlxray.preflight`: train, doctor, evaluate, submit) need these answers in well
under a second, before any weights are read: which outputs (and so which metrics) a model has, and
whether it takes the shards' images at `model.img_size` or resizes them itself. Tests hold each
answer equal to the built model's (`model.tasks`).
"""

from __future__ import annotations

from mtlxray.config import ModelConfig

__all__ = ["model_tasks", "resizes_input", "CLASSIFIER_ONLY"]

CLASSIFIER_ONLY = frozenset({"swin_t_cls", "vit_b_cls", "dinov2_cls", "beitv2_cls", "clip_zeroshot"})
"""Models with only a class output; they resize any input to their own size (`model.img_size`
for the timm classifiers, the image tower's for CLIP)."""

_SEGMENTATION_ONLY = frozenset({"unet", "unetpp", "deeplabv3p"})


def model_tasks(cfg: ModelConfig, phase: str = "phase1") -> frozenset[str]:
    """The outputs (`lung`, `inf`, `cls`, `det`) model `cfg.name` produces in `phase`.

    The Swin-UNet has no infection output in phase 1; the smp segmenters only `lung` (`mtl_unet`
    also `cls`); the classifiers and zero-shot CLIP only `cls`. A detection head (`model.det_head`,
    on the Swin-UNet or an smp model) adds `det` in both phases."""
    det = frozenset({"det"}) if cfg.det_head != "none" and cfg.name not in CLASSIFIER_ONLY else frozenset()
    return _tasks(cfg, phase) | det


def _tasks(cfg: ModelConfig, phase: str) -> frozenset[str]:
    if cfg.name in CLASSIFIER_ONLY:
        return frozenset({"cls"})
    if cfg.name in _SEGMENTATION_ONLY:
        return frozenset({"lung"})
    if cfg.name == "mtl_unet":
        return frozenset({"lung", "cls"})
    return frozenset({"lung", "cls"}) if phase == "phase1" else frozenset({"lung", "inf", "cls"})


def resizes_input(cfg: ModelConfig) -> bool:
    """True when the model resizes its input itself, so shards of any image size fit it; otherwise
    the shards must hold `model.img_size`² images (the size the model is built for)."""
    return cfg.name in CLASSIFIER_ONLY

"""The model registry: one `ModelSpec` per `model.name`, and `build_model`.

Each model's module registers its builder beside the class it builds, with `register_model`
(timm's idiom: the builder's function name is the model's name): `net` the Swin-UNet, `zoo` the
smp and timm baselines, `clip` zero-shot CLIP. `mtlxray.model` imports those modules, so the
registry is complete whenever anything from the package is imported.

A spec answers from the config alone, before any model is built or weights read (the trainer's
preflight and `mtlxray evaluate` need that in well under a second): which outputs a model produces
in each phase (`spec.tasks(phase)`; `model_tasks(cfg, phase)` adds the detection head's `det`),
whether it takes the shards' images at `model.img_size` or resizes them itself
(`spec.resizes_input`), and which config field names its weights file (`spec.weights_field`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Literal, Optional

import torch.nn as nn

from mtlxray.config import ModelConfig
from mtlxray.errors import ConfigError
from mtlxray.model.detection import attach_det_head

__all__ = ["ModelSpec", "register_model", "model_spec", "model_names", "model_tasks", "build_model"]

log = logging.getLogger(__name__)

Kind = Literal["multitask", "segmentation", "classifier", "zero-shot"]
WeightsField = Literal["pretrained", "encoder_pretrained"]
Builder = Callable[[ModelConfig, bool], nn.Module]


@dataclass(frozen=True)
class ModelSpec:
    """What mtlxray knows of one model without building it."""

    name: str
    """`model.name`."""
    kind: Kind
    """multitask (masks and classes), segmentation (lung mask only), classifier, or zero-shot (CLIP)."""
    builder: Builder
    """builder(cfg, pretrained) -> the model in phase1 mode; with `pretrained`, weights from `cfg.<weights_field>`."""
    phase1_tasks: frozenset[str]
    phase2_tasks: frozenset[str]
    weights_field: WeightsField
    """The config field naming the model's weights file; the other must stay empty."""
    resizes_to: Optional[str]
    """The size the model resizes any input to; None when it takes only `model.img_size`² images."""

    def tasks(self, phase: str = "phase1") -> frozenset[str]:
        """The outputs (`lung`, `inf`, `cls`) the model produces in `phase`, without a detection head."""
        if phase == "phase1":
            return self.phase1_tasks
        if phase == "phase2":
            return self.phase2_tasks
        raise ValueError(f"phase must be 'phase1' or 'phase2', got {phase!r}")

    @property
    def outputs(self) -> frozenset[str]:
        """Every output the model can produce, in either phase (a built model's `tasks`)."""
        return self.phase1_tasks | self.phase2_tasks

    @property
    def resizes_input(self) -> bool:
        """True when the model resizes its input itself, so shards of any image size fit it."""
        return self.resizes_to is not None

    @property
    def takes_det_head(self) -> bool:
        """Whether `model.det_head` can sit on the model's spatial features."""
        return self.kind in ("multitask", "segmentation")


_SPECS: dict[str, ModelSpec] = {}


def register_model(kind: Kind, tasks: set[str], *, phase2_tasks: Optional[set[str]] = None,
                   weights_field: WeightsField = "pretrained",
                   resizes_to: Optional[str] = None) -> Callable[[Builder], Builder]:
    """Decorator registering a builder under its function name.

    tasks: the outputs in phase 1, and in phase 2 unless `phase2_tasks` says otherwise.
    """
    def register(builder: Builder) -> Builder:
        name = builder.__name__
        if name in _SPECS:
            raise ValueError(f"model {name!r} is registered twice ({_SPECS[name].builder.__module__} "
                             f"and {builder.__module__})")
        _SPECS[name] = ModelSpec(
            name=name, kind=kind, builder=builder, phase1_tasks=frozenset(tasks),
            phase2_tasks=frozenset(tasks if phase2_tasks is None else phase2_tasks),
            weights_field=weights_field, resizes_to=resizes_to,
        )
        return builder

    return register


def model_names() -> list[str]:
    """Every registered `model.name`, in registration order."""
    return list(_SPECS)


def model_spec(name: str) -> ModelSpec:
    """The spec of model `name`; ConfigError naming the choices when there is none."""
    try:
        return _SPECS[name]
    except KeyError:
        raise ConfigError(f"model.name: unknown model {name!r}; choose from {', '.join(_SPECS)}") from None


def model_tasks(cfg: ModelConfig, phase: str = "phase1") -> frozenset[str]:
    """The outputs (`lung`, `inf`, `cls`, `det`) model `cfg.name` produces in `phase`.

    The Swin-UNet has no infection output in phase 1; the smp segmenters only `lung` (`mtl_unet`
    also `cls`); the classifiers and zero-shot CLIP only `cls`. A detection head (`model.det_head`,
    on the Swin-UNet or an smp model) adds `det` in both phases."""
    spec = model_spec(cfg.name)
    det = frozenset({"det"}) if cfg.det_head != "none" and spec.takes_det_head else frozenset()
    return spec.tasks(phase) | det


def build_model(cfg: ModelConfig, pretrained: bool = True) -> nn.Module:
    """Build the model named by `cfg.name` (see `model_names()`) in phase1 mode, an `MTLModel`.

    With `pretrained` (the default) the weights named by `model.pretrained` or
    `model.encoder_pretrained` are loaded from their local files; pass False when a checkpoint's
    weights will be loaded over the model anyway (`MTLModel.from_pretrained`, export).
    """
    spec = model_spec(cfg.name)
    for name in ("pretrained", "encoder_pretrained"):
        if name != spec.weights_field and getattr(cfg, name):
            raise ConfigError(f"model.{name} is not read by {cfg.name}; its weights file goes in "
                              f"model.{spec.weights_field}")
    model = spec.builder(cfg, pretrained)
    model.tasks = spec.outputs
    if cfg.det_head != "none":
        attach_det_head(model, cfg)
    model.set_grad_checkpointing(cfg.grad_checkpoint)
    if model.attention_kernel is not None:
        # The kernel for a device and precision is chosen where the model is placed there
        # (model.set_attention(mtlxray.hardware.resolve_attention(...)), which logs the choice).
        log.debug("window attention: %s as built (model.attention=%s)", model.attention_kernel, cfg.attention)
    return model

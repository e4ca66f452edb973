"""What a phase trains, read from cfg.phase as data: frozen prefixes and the model's mode."""

from __future__ import annotations

import logging

from torch import nn

from mtlxray.config import PhaseConfig
from mtlxray.errors import ConfigError
from mtlxray.model.base import under_prefix

__all__ = ["apply_freezing", "frozen_prefixes", "prepare_phase"]

logger = logging.getLogger(__name__)


def apply_freezing(model: nn.Module, frozen: list[str], bn_stats: str = "update") -> int:
    """Set requires_grad=False under each prefix; returns the number of parameters it froze.

    Must run before the model is wrapped, so that DDP/DeepSpeed never register frozen parameters.
    Other parameters keep their flag (the model's set_mode parks the other phase's class input).
    `bn_stats="keep"` also holds the running statistics of the batch norms under those prefixes
    (momentum 0: the running averages take nothing from a batch), which requires_grad alone does not.
    """
    names = [n for n, _ in model.named_parameters()]
    for prefix in frozen:
        if not any(under_prefix(n, prefix) for n in names):
            raise ConfigError(f"phase.frozen: prefix `{prefix}` matches no parameter of the model")
    n_frozen = 0
    for name, p in model.named_parameters():
        if any(under_prefix(name, prefix) for prefix in frozen):
            p.requires_grad_(False)
            n_frozen += p.numel()
    if bn_stats == "keep":
        for name, m in model.named_modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm) and any(under_prefix(name, prefix) for prefix in frozen):
                m.momentum = 0.0
    return n_frozen


def frozen_prefixes(model: nn.Module, phase: PhaseConfig) -> list[str]:
    """phase.frozen plus the first phase.freeze_encoder_blocks encoder blocks of the model."""
    prefixes = list(phase.frozen)
    if phase.freeze_encoder_blocks:
        if not hasattr(model, "encoder_block_prefixes"):
            raise ConfigError(f"phase.freeze_encoder_blocks: {type(model).__name__} has no encoder blocks to count")
        prefixes += model.encoder_block_prefixes(phase.freeze_encoder_blocks)
    return prefixes


def prepare_phase(model: nn.Module, phase: PhaseConfig) -> None:
    """Switch the model to the phase's mode (which parks the parts it never uses), then freeze."""
    model.set_mode(phase.name)
    parked = {n for n, p in model.named_parameters() if not p.requires_grad}
    frozen = apply_freezing(model, frozen_prefixes(model, phase), phase.frozen_bn_stats)
    n_total = sum(p.numel() for p in model.parameters())
    n_trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    n_parked = sum(p.numel() for n, p in model.named_parameters() if n in parked)
    logger.info("%s: training %d of %d parameters; frozen by the phase: %d (%s); unused in this mode: %d",
                phase.name, n_trained, n_total, frozen, ", ".join(phase.frozen) or "no prefix"
                + (f", the first {phase.freeze_encoder_blocks} encoder blocks" if phase.freeze_encoder_blocks else ""),
                n_parked)

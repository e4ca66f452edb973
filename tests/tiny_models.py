"""Randomly initialised models that look trained where it matters for round trips: BN statistics off their init."""

from __future__ import annotations

import torch

from mtlxray.config import ModelConfig
from mtlxray.model import MTLModel, build_model


def model_with_moved_bn(model_cfg: ModelConfig, phase: str, seed: int = 0, *, mean_std: float = 0.2,
                        var_range: tuple[float, float] = (0.5, 2.0)) -> MTLModel:
    """A model built with seed `seed` and set to `phase`, its BN running means drawn from N(0, mean_std) and
    running variances from U(var_range), so that a buffer lost or misplaced on the way changes the outputs."""
    torch.manual_seed(seed)
    model = build_model(model_cfg, pretrained=False)
    model.set_mode(phase)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            if name.endswith("running_mean"):
                buf.normal_(0, mean_std)
            elif name.endswith("running_var"):
                buf.uniform_(*var_range)
    return model

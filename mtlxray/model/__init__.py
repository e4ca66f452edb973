"""The multi-task Swin-UNet (and U-Net baselines): `build_model(cfg.model)`, parameter counts per part."""

from mtlxray.model.base import MTLModel
from mtlxray.model.net import MODELS, MTLSwinUNet, MultiTaskUNet, build_model
from mtlxray.model.summary import count_params_by_part

__all__ = ["MTLModel", "build_model", "MTLSwinUNet", "MultiTaskUNet", "MODELS", "count_params_by_part"]

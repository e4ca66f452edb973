"""The multi-task Swin-UNet (and the baselines): `build_model(cfg.model)`, each model's spec, parameter counts per part."""

from mtlxray.model.base import MTLModel
from mtlxray.model.net import MTLSwinUNet, MultiTaskUNet
from mtlxray.model import zoo, clip  # noqa: F401  (importing them registers their models, after net's)
from mtlxray.model.registry import ModelSpec, build_model, model_names, model_spec, model_tasks
from mtlxray.model.summary import count_params_by_part

__all__ = ["MTLModel", "build_model", "MTLSwinUNet", "MultiTaskUNet", "ModelSpec", "model_names", "model_spec",
           "model_tasks", "count_params_by_part"]

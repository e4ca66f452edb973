"""The model registry: every registered model builds and produces exactly the outputs its spec names."""

import pytest
import torch

from _model_support import tiny_config
from _zoo_support import tiny_zoo_config, write_tiny_clip
from mtlxray.config import ModelConfig
from mtlxray.errors import ConfigError
from mtlxray.model import build_model, model_names, model_spec, model_tasks
from mtlxray.model.registry import register_model


def _tiny(name: str, tmp_path) -> ModelConfig:
    """A tiny instance of registered model `name` (a model registered without one fails here)."""
    if name == "mtl_swin_unet":
        return tiny_config(drop_path_rate=0.0)
    if name == "clip_zeroshot":
        arch, _ = write_tiny_clip(tmp_path)
        return ModelConfig(name=name, img_size=64, clip_arch=str(arch))
    return tiny_zoo_config(name)


@pytest.mark.parametrize("name", model_names())
def test_every_registered_model_builds_and_produces_the_tasks_its_spec_names(name, tmp_path):
    spec = model_spec(name)
    cfg = _tiny(name, tmp_path)
    torch.manual_seed(0)
    model = build_model(cfg, pretrained=False).eval()
    assert model.tasks == spec.outputs
    x = torch.rand(1, 1, cfg.img_size, cfg.img_size)
    for phase in ("phase1", "phase2"):
        with torch.no_grad():
            out = model(x, mode=phase)
        produced = {k for k, v in out.items() if v is not None}
        assert produced == spec.tasks(phase) == model_tasks(cfg, phase), phase
    if spec.resizes_input:  # so shards of another image size fit it
        with torch.no_grad():
            assert model(torch.rand(1, 1, 40, 40))["cls"].shape == (1, cfg.num_classes)


def test_a_detection_head_adds_det_to_the_tasks_of_models_with_spatial_features():
    assert model_tasks(ModelConfig(name="unet", det_head="fcos"), "phase2") == {"lung", "det"}
    assert model_tasks(ModelConfig(name="mtl_swin_unet", det_head="kbox"), "phase1") == {"lung", "cls", "det"}
    assert model_tasks(ModelConfig(name="vit_b_cls", det_head="fcos")) == {"cls"}  # build_model refuses it


def test_unknown_names_and_phases_are_refused_in_one_line():
    with pytest.raises(ConfigError, match="unknown model 'resnet'; choose from mtl_swin_unet, unet, "):
        model_spec("resnet")
    with pytest.raises(ValueError, match="phase3"):
        model_spec("unet").tasks("phase3")


def test_a_model_name_registers_once():
    def unet(cfg: ModelConfig, pretrained: bool) -> None:
        raise AssertionError("never built")

    with pytest.raises(ValueError, match="'unet' is registered twice"):
        register_model("segmentation", tasks={"lung"})(unet)
    assert model_spec("unet").builder is not unet

"""Tiny settings for the model-zoo tests: every library model at a few hundred thousand parameters."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from mtlxray.config import ModelConfig

SMP_TINY = {"encoder": "tu-resnet10t", "img_size": 64,
            "lib_kwargs": {"decoder_channels": [16, 16, 8, 8, 8]}}
TINY: dict[str, dict] = {
    "unet": SMP_TINY,
    "unetpp": SMP_TINY,
    "deeplabv3p": {**SMP_TINY, "lib_kwargs": {"decoder_channels": 16}},
    "mtl_unet": SMP_TINY,
    "swin_t_cls": {"img_size": 64, "lib_kwargs": {"embed_dim": 24, "depths": [1, 1, 2, 1],
                                                  "num_heads": [1, 2, 2, 4], "window_size": 4}},
    "vit_b_cls": {"img_size": 32, "lib_kwargs": {"embed_dim": 32, "depth": 3, "num_heads": 2}},
    "dinov2_cls": {"img_size": 28, "lib_kwargs": {"embed_dim": 32, "depth": 3, "num_heads": 2}},
    "beitv2_cls": {"img_size": 32, "lib_kwargs": {"embed_dim": 32, "depth": 3, "num_heads": 2}},
}
"""Registry name -> ModelConfig fields of a tiny instance."""

SMP_NAMES = ["unet", "unetpp", "deeplabv3p", "mtl_unet"]
TIMM_NAMES = ["swin_t_cls", "vit_b_cls", "dinov2_cls", "beitv2_cls"]

TINY_CLIP = {
    "embed_dim": 16,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}
"""An open_clip model config: 2-layer ViT image tower, 1-layer text tower (the standard BPE vocabulary)."""


def tiny_zoo_config(name: str, **overrides) -> ModelConfig:
    fields = {"name": name, **TINY[name]}
    fields.update(overrides)
    return ModelConfig(**fields)


def save_weights(module: torch.nn.Module, path: Path) -> Path:
    """The module's state dict as .safetensors (tensors made contiguous, shared storage split)."""
    save_file({k: v.detach().clone().contiguous() for k, v in module.state_dict().items()}, str(path))
    return path


def write_tiny_clip(folder: Path, seed: int = 0) -> tuple[Path, Path]:
    """(model-config JSON, weights .safetensors) of a randomly initialised tiny open_clip model."""
    import open_clip

    arch = folder / "tiny-clip-mtlxray-test.json"
    arch.write_text(json.dumps(TINY_CLIP))
    open_clip.add_model_config(arch)
    torch.manual_seed(seed)
    model = open_clip.create_model(arch.stem, pretrained=None)
    with torch.no_grad():
        model.logit_scale.fill_(2.0)  # a distinct value to check it is loaded
    return arch, save_weights(model, folder / "tiny_clip.safetensors")

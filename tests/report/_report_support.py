"""Shared helpers of the report tests: a tiny, randomly initialised model saved as the trainer saves one."""

from pathlib import Path

import torch
from safetensors.torch import save_file

from mtlxray.checkpoint import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, TrainState
from mtlxray.config import dump_config, load_config
from mtlxray.model import build_model

TINY_MODEL = [
    "model.img_size=64", "model.embed_dim=12", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,2,2]",
    "model.window_size=4", "model.drop_path_rate=0.0", "model.ppm_bins=[1,2]", "model.ppm_channels=16",
    "model.decoder_channels=[24,16,12,8]", "model.cross_attn_heads=[2,1,1,1]", "model.head_channels=8",
    "model.cls_channels=8", "data.workers=0",
]


def write_checkpoint(root: Path, phase: str = "phase2", seed: int = 0, *overrides: str) -> Path:
    """root/checkpoints/best with weights, config and state, as the trainer writes them."""
    cfg = load_config(None, TINY_MODEL + [f"phase.name={phase}", *overrides])
    torch.manual_seed(seed)
    model = build_model(cfg.model)
    ckpt = root / "checkpoints" / "best"
    ckpt.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(ckpt / WEIGHTS_NAME))
    (ckpt / CONFIG_NAME).write_text(dump_config(cfg))
    (ckpt / STATE_NAME).write_text(TrainState(phase=phase).to_json())
    return ckpt

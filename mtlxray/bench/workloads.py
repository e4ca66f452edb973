"""The networks the suites measure (ours, and MONAI's Swin-T as the peer) and one training step."""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from mtlxray.bench.common import SuiteUnavailable
from mtlxray.memory_plan import ours_from_config, place, tensor_sum

TINY = ["model.img_size=64", "model.embed_dim=24", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,4,8]",
        "model.window_size=4", "model.ppm_bins=[1,2]", "model.ppm_channels=24",
        "model.decoder_channels=[48,24,16,8]", "model.cross_attn_heads=[4,2,1,1]", "model.head_channels=8",
        "model.cls_channels=8", "model.drop_path_rate=0.0"]
"""A minimal model for smoke runs and the ddp suite (every part present, tiny widths)."""


def ours(overrides: list[str] | None = None, phase: str = "phase2") -> nn.Module:
    """Our multi-task model from the default (paper) config plus `model.*` overrides, in `phase`
    mode: phase2 trains everything; phase1 freezes the infection decoder and head as training does."""
    from mtlxray.config import load_config

    return ours_from_config(load_config(None, overrides or []), phase)


def monai_swin_t(*, use_checkpoint: bool = False, tiny: bool = False) -> nn.Module:
    """MONAI's SwinTransformer configured as Swin-T (2D, 1 channel, patch 4, embed 96, 2-2-6-2,
    heads 3-6-12-24, window 7): the peer encoder. `tiny` shrinks widths and depths for smoke runs."""
    try:
        from monai.networks.nets.swin_unetr import SwinTransformer
    except ImportError as e:
        raise SuiteUnavailable(f"MONAI is not installed (pip install 'mtlxray[bench]'): {e}") from None
    embed, depths, heads = (24, (1, 1, 1, 1), (1, 2, 4, 8)) if tiny else (96, (2, 2, 6, 2), (3, 6, 12, 24))
    return SwinTransformer(
        in_chans=1, embed_dim=embed, window_size=(7, 7), patch_size=(4, 4), depths=depths,
        num_heads=heads, spatial_dims=2, use_checkpoint=use_checkpoint)


def train_step(model: nn.Module, x: torch.Tensor, dtype: str = "fp32",
               forward: Callable[[torch.Tensor], Any] | None = None) -> Callable[[], None]:
    """One forward+backward on `x`'s device (autocast in bf16 over fp32 weights), gradients dropped
    after. Our model runs the attention kernel `auto` resolves to for this dtype and device. On a
    GPU the step ends with a synchronize, so that timing it times the work."""
    place(model, dtype, x.device)
    fwd = model if forward is None else forward
    bf16 = dtype == "bf16"
    cuda = x.device.type == "cuda"

    def step() -> None:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
            out = fwd(x)
        tensor_sum(out).backward()
        for p in model.parameters():
            p.grad = None
        if cuda:
            torch.cuda.synchronize(x.device)

    return step

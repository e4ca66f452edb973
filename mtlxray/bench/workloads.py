"""The networks the suites measure (ours, and the Swin-Ts of MONAI and timm as peers) and one training step."""

from __future__ import annotations

import copy
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


DECODER_PARTS = ("ppm", "lung_decoder", "inf_decoder", "lung_head", "inf_head", "cls_head")


def channels_last_decoder(model: nn.Module) -> nn.Module:
    """A copy of `model` whose decoder-side convolutions hold their weights in channels_last."""
    model = copy.deepcopy(model)
    for name in DECODER_PARTS:
        part = getattr(model, name, None)
        if part is not None:
            part.to(memory_format=torch.channels_last)
    return model


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


def timm_swin_t(img_size: int = 256, *, tiny: bool = False) -> nn.Module:
    """timm's `swin_tiny_patch4_window7_224` as an encoder at `img_size` (1 channel, no classifier;
    call its `forward_features`), with our config's stochastic depth so that both do the same work
    per step (timm's default is none). `tiny` shrinks it as TINY does ours, for smoke runs."""
    try:
        import timm
    except ImportError as e:
        raise SuiteUnavailable(f"timm is not installed (pip install 'mtlxray[zoo]'): {e}") from None
    from mtlxray.config import load_config

    shape = dict(embed_dim=24, depths=(1, 1, 1, 1), num_heads=(1, 2, 4, 8), window_size=4) if tiny else {}
    drop_path = load_config(None, TINY if tiny else []).model.drop_path_rate
    return timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, in_chans=1, img_size=img_size,
                             num_classes=0, drop_path_rate=drop_path, **shape)


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

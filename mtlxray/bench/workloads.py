"""The networks the suites measure (ours, and MONAI's Swin-T as the peer) and one training step."""

from __future__ import annotations

import importlib.util
from typing import Any, Callable

import torch
from torch import nn

from mtlxray.bench.common import SuiteUnavailable

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def have_model() -> bool:
    return importlib.util.find_spec("mtlxray.model") is not None and hasattr(
        importlib.import_module("mtlxray.model"), "build_model")


TINY = ["model.img_size=64", "model.embed_dim=24", "model.depths=[1,1,1,1]", "model.num_heads=[1,2,4,8]",
        "model.window_size=4", "model.ppm_bins=[1,2]", "model.ppm_channels=24",
        "model.decoder_channels=[48,24,16,8]", "model.cross_attn_heads=[4,2,1,1]", "model.head_channels=8",
        "model.cls_channels=8", "model.drop_path_rate=0.0"]
"""A minimal model for smoke runs and the ddp suite (every part present, tiny widths)."""


def ours(overrides: list[str] | None = None, phase: str = "phase2") -> nn.Module:
    """Our multi-task model from the default (paper) config plus `model.*` overrides, in `phase`
    mode: phase2 trains everything; phase1 freezes the infection decoder and head as training does."""
    if not have_model():
        raise SuiteUnavailable("mtlxray.model.build_model is not part of this build")
    from mtlxray.config import load_config
    from mtlxray.model import build_model

    cfg = load_config(None, overrides or [])
    model = build_model(cfg.model)
    if phase == "phase1":
        from mtlxray.train.phases import apply_freezing

        apply_freezing(model, cfg.phase.frozen)
    model.set_mode(phase)
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


def tensor_sum(out: Any) -> torch.Tensor:
    """A scalar loss touching every tensor output (dicts, lists and tuples are walked; None skipped)."""
    if out is None:
        return torch.zeros(())
    if isinstance(out, torch.Tensor):
        return out.float().mean()
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (list, tuple)):
        return sum(tensor_sum(o) for o in out)
    raise TypeError(f"unexpected model output {type(out).__name__}")


def train_step(model: nn.Module, x: torch.Tensor, dtype: str = "fp32",
               forward: Callable[[torch.Tensor], Any] | None = None) -> Callable[[], None]:
    """One forward+backward (autocast in bf16, fp32 weights), gradients dropped after."""
    fwd = forward or model
    bf16 = dtype == "bf16"

    def step() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = fwd(x)
        tensor_sum(out).backward()
        for p in model.parameters():
            p.grad = None

    return step

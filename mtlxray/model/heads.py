"""Output heads: per-pixel mask logits and the image-level class head over the predicted masks."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlxray.model.base import Mode

__all__ = ["MaskHead", "ClassHead"]

class MaskHead(nn.Module):
    """3×3 conv C→mid (no bias) + BN + ReLU, 1×1 conv mid→1, bilinear upsample to the image size.

    With C=48, mid=24: 10,368 + 48 (BN) + 25 = 10,441 parameters, the paper's 10.44K. Returns
    logits; the sigmoid lives in the loss.

    The output bias starts at the logit of `prior`, the expected share of foreground pixels
    (RetinaNet's prior initialisation). Behind the batch norm, only the 24 output weights and the
    norm's scale set the logits' magnitude, and Adam moves each by about the learning rate per
    step, so a head starting at logit 0 everywhere needs hundreds of steps to push the background
    down; a sparse target such as infection then marks every image at first.
    """

    def __init__(self, in_chs: int = 48, mid_chs: int = 24, prior: float = 0.5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_chs, mid_chs, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(mid_chs)
        self.act = nn.ReLU(inplace=True)
        self.out = nn.Conv2d(mid_chs, 1, 1)
        nn.init.constant_(self.out.bias, math.log(prior / (1 - prior)))

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        x = self.out(self.act(self.bn(self.conv(x))))  # B, 1, h, w
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # B, 1, H, W


class ClassHead(nn.Module):
    """Classify from the predicted mask probabilities: 3×3 conv -> BN -> ReLU -> GAP -> FC.

    Holds one input conv per phase: `conv_phase1` over the lung mask (1→C) and `conv_phase2` over
    the lung and infection masks (2→C); BN and FC are shared. `set_mode` sets requires_grad=False
    on the conv the mode does not use, so DDP without unused-parameter search works. With
    `bottleneck_chs` > 0 the pooled bottleneck features are concatenated before the FC.
    """

    def __init__(self, channels: int = 64, num_classes: int = 3, bottleneck_chs: int = 0) -> None:
        super().__init__()
        self.conv_phase1 = nn.Conv2d(1, channels, 3, padding=1)
        self.conv_phase2 = nn.Conv2d(2, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels + bottleneck_chs, num_classes)
        self.bottleneck_chs = bottleneck_chs
        self._parked: Optional[str] = None
        self.set_mode("phase1")

    def set_mode(self, mode: Mode) -> None:
        """Freeze the other phase's input conv; re-enable this phase's conv if `set_mode` froze it."""
        active, idle = ("conv_phase1", "conv_phase2") if mode == "phase1" else ("conv_phase2", "conv_phase1")
        if self._parked == active:
            getattr(self, active).requires_grad_(True)
        getattr(self, idle).requires_grad_(False)
        self._parked = idle

    @torch.no_grad()
    def init_phase2_from_phase1(self) -> None:
        """Start `conv_phase2` as `conv_phase1` on the lung channel and zero on the infection channel,
        so the phase-2 head first computes exactly what phase 1 learned."""
        self.conv_phase2.weight.zero_()
        self.conv_phase2.weight[:, :1].copy_(self.conv_phase1.weight)
        self.conv_phase2.bias.copy_(self.conv_phase1.bias)

    def forward(self, masks: torch.Tensor, bottleneck: Optional[torch.Tensor] = None) -> torch.Tensor:
        """masks: (B, 1|2, H, W) probabilities; bottleneck: (B, Cb) pooled features -> (B, classes)."""
        conv = self.conv_phase1 if masks.shape[1] == 1 else self.conv_phase2
        x = self.act(self.bn(conv(masks))).mean(dim=(2, 3))  # B, C
        if self.bottleneck_chs:
            x = torch.cat([x, bottleneck.to(x.dtype)], dim=1)  # B, C + Cb
        return self.fc(x)

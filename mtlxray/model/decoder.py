"""Pyramid pooling on the bottleneck, U-Net up-convolution stages, and the cross-branch attention.

Per branch (Swin-T sizes): four UpConv stages of 384/192/96/48 channels, ≈7.03M parameters.
The cross-attention at each scale (heads 8/4/2/1, so 48 channels per head) has, per direction,
an SE gate C→C/2→C (C² + 1.5C) and a depthwise-separable refinement (9C + C² + 2C for BN): about
2C² per direction and 4C² per scale for both branches, 0.80M in all. The two branches together
come to 14.87M, within 1% of the paper's 14.77M for its decoders.
"""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlxray.model.recompute import CheckpointMode, run_segment

__all__ = ["ConvBNReLU", "PPM", "UpConv", "CrossAttention", "DecoderBranch"]


class ConvBNReLU(nn.Sequential):
    """Conv (no bias) -> BatchNorm -> ReLU, 'same' padding."""

    def __init__(self, in_chs: int, out_chs: int, kernel_size: int = 3) -> None:
        super().__init__(
            nn.Conv2d(in_chs, out_chs, kernel_size, padding=kernel_size // 2, bias=False),
            nn.BatchNorm2d(out_chs),
            nn.ReLU(inplace=True),
        )


class PPM(nn.Module):
    """Pyramid pooling: pool to each bin, 1×1 conv to `branch_chs`, upsample, concat with the input, fuse.

    (B, C, h, w) -> (B, C, h, w). BatchNorm after the 1-bin pool needs batch ≥ 2 while training.
    """

    def __init__(self, in_chs: int = 768, bins: Sequence[int] = (1, 2, 3, 6), branch_chs: int = 192) -> None:
        super().__init__()
        self.bins = tuple(bins)
        self.branches = nn.ModuleList([ConvBNReLU(in_chs, branch_chs, 1) for _ in self.bins])
        self.fuse = ConvBNReLU(in_chs + len(self.bins) * branch_chs, in_chs, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = x.shape[-2:]
        pooled = [
            F.interpolate(branch(F.adaptive_avg_pool2d(x, b)), size=size, mode="bilinear", align_corners=False)
            for b, branch in zip(self.bins, self.branches)
        ]
        return self.fuse(torch.cat([x, *pooled], dim=1))  # B, C + n*branch, h, w -> B, C, h, w


class UpConv(nn.Module):
    """×2 bilinear upsample, concat the encoder skip (if any), two 3×3 conv+BN+ReLU."""

    def __init__(self, in_chs: int, skip_chs: int, out_chs: int) -> None:
        super().__init__()
        self.conv = nn.Sequential(ConvBNReLU(in_chs + skip_chs, out_chs), ConvBNReLU(out_chs, out_chs))
        self.grad_checkpoint: CheckpointMode = "none"

    def _forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="bilinear", align_corners=False)  # B, Cin, 2h, 2w
        if skip is not None:
            x = torch.cat([x, skip], dim=1)  # B, Cin + Cskip, 2h, 2w
        return self.conv(x)

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        return run_segment(self, self._forward, x, skip)


class CrossAttention(nn.Module):
    """Update branch `x` from the other branch `other` (both B×C×H×W): x + refine(x · gate(GAP(other))).

    The gate is squeeze-and-excitation style, C→C/reduction→C on the other branch's pooled
    features, normalised by a softmax over the channels of each head (times the head width, so
    the mean gate is 1): each head re-weights its channel group by what the other task attends to.
    The refinement is depthwise 3×3 + pointwise 1×1 + BN, added back residually.
    """

    def __init__(self, chs: int, heads: int, reduction: int = 2) -> None:
        super().__init__()
        if chs % heads:
            raise ValueError(f"cross-attention channels {chs} not divisible by heads {heads}")
        self.heads = heads
        hidden = max(chs // reduction, 1)
        # not in place: the Linear output is kept by selective checkpointing and must stay unmutated
        self.gate = nn.Sequential(nn.Linear(chs, hidden), nn.ReLU(), nn.Linear(hidden, chs))
        self.refine = nn.Sequential(
            nn.Conv2d(chs, chs, 3, padding=1, groups=chs, bias=False),
            nn.Conv2d(chs, chs, 1, bias=False),
            nn.BatchNorm2d(chs),
        )
        self.grad_checkpoint: CheckpointMode = "none"

    def forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        return run_segment(self, self._forward, x, other)

    def _forward(self, x: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
        B, C = x.shape[:2]
        logits = self.gate(other.mean(dim=(2, 3)))  # B, C
        gate = logits.view(B, self.heads, C // self.heads).softmax(dim=-1, dtype=torch.float32) * (C // self.heads)
        return x + self.refine(x * gate.view(B, C, 1, 1).to(x.dtype))


class DecoderBranch(nn.Module):
    """One decoder branch: UpConv stages and, optionally, the cross-attention updating this branch.

    The network interleaves the two branches stage by stage (see `MTLSwinUNet.forward`), so this
    module holds the parts rather than running them.
    """

    def __init__(self, in_chs: int, skip_chs: Sequence[int], channels: Sequence[int],
                 cross_heads: Optional[Sequence[int]] = None) -> None:
        super().__init__()
        ins = [in_chs, *channels[:-1]]
        skips = list(skip_chs) + [0] * (len(channels) - len(skip_chs))
        self.stages = nn.ModuleList([UpConv(i, s, o) for i, s, o in zip(ins, skips, channels)])
        self.cross = (nn.ModuleList([CrossAttention(c, h) for c, h in zip(channels, cross_heads)])
                      if cross_heads is not None else None)
        self.out_chs = channels[-1]

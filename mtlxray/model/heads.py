"""Output heads: per-pixel mask logits and the image-level class head over the predicted masks."""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlxray.model.base import Mode
from mtlxray.model.swin import with_own_backward

__all__ = ["MaskHead", "ClassHead", "pooled_conv_bn_relu"]

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


class _PooledReLU(torch.autograd.Function):
    """(B·P, K) patch rows `u`, (C, K) weights `a` -> (B, C): each image's mean over its P pixels
    of relu(u @ aᵀ).

    Autograd would keep the ReLU's (B·P, C) output and, in backward, write the mean's gradient
    out in full, then mask it: two passes over the largest tensor of the head. Here the mean's
    gradient stays broadcast and the ReLU's backward reads it as it masks (one pass)."""

    @staticmethod
    def forward(ctx, u: torch.Tensor, a: torch.Tensor, batch: int) -> torch.Tensor:
        z = (u @ a.t()).relu_()  # B·P, C
        ctx.save_for_backward(u, a, z)
        return z.view(batch, -1, z.shape[1]).mean(1)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        u, a, z = ctx.saved_tensors
        B, C = grad.shape
        P = z.shape[0] // B
        # ReLU's own backward kernel, with the mean's gradient broadcast over the pixels (stride 0).
        dz = torch.ops.aten.threshold_backward((grad / P).unsqueeze(1).expand(B, P, C), z.view(B, P, C), 0)
        dz = dz.view(B * P, C)
        du = dz @ a if ctx.needs_input_grad[0] else None
        da = dz.t() @ u if ctx.needs_input_grad[1] else None
        return du, da, None


def _moments(u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(M, K) rows -> their mean (K) and biased covariance (K, K), centred first (no cancellation)."""
    mean = u.mean(0)
    centred = u - mean
    return mean, centred.t() @ centred / u.shape[0]


class _Moments(torch.autograd.Function):
    """`_moments`, recomputing the centred rows in backward from `u` (which `_PooledReLU` keeps
    anyway) rather than keeping a second (M, K) tensor for it."""

    @staticmethod
    def forward(ctx, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mean, cov = _moments(u)
        ctx.save_for_backward(u, mean)
        return mean, cov

    @staticmethod
    def backward(ctx, dmean: torch.Tensor, dcov: torch.Tensor) -> torch.Tensor:
        u, mean = ctx.saved_tensors
        M = u.shape[0]
        # cov = Σ cᵢcᵢᵀ / M with cᵢ = uᵢ - mean; the path through the mean adds nothing (Σ cᵢ = 0).
        return (u - mean) @ ((dcov + dcov.t()) / M) + dmean / M


def _running_stats_update(bn: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, n: int) -> None:
    """What a training-mode `bn` does to its running statistics for a batch of `n` values per
    channel with this mean and (biased) variance: the same factor, formula and unbiased variance."""
    bn.num_batches_tracked.add_(1)
    factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    bn.running_mean.mul_(1 - factor).add_(mean, alpha=factor)
    bn.running_var.mul_(1 - factor).add_(var * (n / max(n - 1, 1)), alpha=factor)


def pooled_conv_bn_relu(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d,
                        fold: Optional[bool] = None) -> torch.Tensor:
    """relu(bn(conv(x))).mean(dim=(2, 3)) for a 3×3 'same' `conv` with a bias: (B, Cin, H, W) -> (B, C).

    The class head runs this at full image resolution in fp32, where its C-channel maps (conv
    output and normed output, 2C floats a pixel kept for backward) were the largest tensors of
    the model, and a convolution over 1-2 input channels uses the convolution libraries poorly.
    Folded, one matrix product over each pixel's K = 9·Cin patch values and a 1 (for the bias)
    gives the normed map directly: the conv is linear, so the batch statistics of its output
    follow from the patches' mean and covariance, and the norm folds into the product's
    weights. That keeps K+1+C floats a pixel and makes fewer passes over the C-channel map, but
    more over the (K+1)-wide patches: it pays where C ≥ 2(K+1), the default for `fold` (the
    paper's C=64 in both phases and the demo's 32 in phase 1; not the tests' 8). Same maths as
    the modules (to fp32 rounding, where the conv weights' gradient comes out closer to a float64
    reference: its sums no longer cancel through the norm's backward), and the same running
    statistics."""
    if (conv.kernel_size, conv.stride, conv.padding, conv.dilation, conv.groups) != ((3, 3), (1, 1), (1, 1), (1, 1), 1) \
            or conv.bias is None:
        raise ValueError(f"pooled_conv_bn_relu takes a 3×3 'same' conv with a bias, got {conv}")
    if fold is None:
        fold = conv.out_channels >= 2 * (9 * conv.in_channels + 1)
    if not fold:
        return bn(conv(x)).relu_().mean(dim=(2, 3))
    B, cin, H, W = x.shape
    C, K, P = conv.out_channels, cin * 9, H * W
    patches = F.unfold(x, 3, padding=1).transpose(1, 2)  # B, P, K (channel-major, as conv.weight)
    u = torch.cat([patches, patches.new_ones(B, P, 1)], dim=2).view(B * P, K + 1)
    w = torch.cat([conv.weight.reshape(C, K), conv.bias.view(C, 1)], dim=1)  # C, K+1 (any weight layout)
    own = with_own_backward()
    if bn.training or bn.running_mean is None:
        mean_u, cov = _Moments.apply(u) if own else _moments(u)  # K+1, (K+1)²; the ones column: 1 and 0
        mean, var = w @ mean_u, ((w @ cov) * w).sum(1)  # the conv output's batch statistics, per channel
        if bn.training and bn.running_mean is not None:
            with torch.no_grad():
                _running_stats_update(bn, mean, var, B * P)
    else:
        mean, var = bn.running_mean, bn.running_var
    scale = torch.rsqrt(var + bn.eps) * (bn.weight if bn.weight is not None else 1.0)
    shift = (bn.bias if bn.bias is not None else 0.0) - scale * mean
    a = scale[:, None] * w + F.pad(shift[:, None], (K, 0))  # C, K+1: bn(conv(patch)) = a @ [patch, 1]
    if own:
        return _PooledReLU.apply(u, a, B)
    return (u @ a.t()).relu_().view(B, P, C).mean(1)


class ClassHead(nn.Module):
    """Classify from the predicted mask probabilities: 3×3 conv -> BN -> ReLU -> GAP -> FC
    (the first four computed together: `pooled_conv_bn_relu`).

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
        x = pooled_conv_bn_relu(masks, conv, self.bn)  # B, C
        if self.bottleneck_chs:
            x = torch.cat([x, bottleneck.to(x.dtype)], dim=1)  # B, C + Cb
        return self.fc(x)

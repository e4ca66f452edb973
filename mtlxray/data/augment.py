"""Training augmentation: a mild random affine plus brightness/contrast, identical for image and masks.

There is no horizontal flip: chest anatomy is not left-right symmetric. The randomness of a sample
comes from `sample_rng(seed, epoch, key)`, so it does not depend on stream position or worker count.
Two implementations share the parameters of `augment_params`: `augment` warps one sample with PIL
in a loader process; `augment_batch` warps a whole batch with `affine_grid`/`grid_sample` on the
training device, which takes the warp (most of a loader core's time) off the CPU.
"""

from __future__ import annotations

import zlib

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from mtlxray.config import AugmentConfig

__all__ = ["sample_rng", "augment_params", "affine_matrix", "augment", "augment_batch"]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def augment_params(cfg: AugmentConfig, rng: np.random.Generator, size: int) -> np.ndarray:
    """One sample's float32 [angle_deg, scale, tx_px, ty_px, contrast, brightness]."""
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
    scale = 1.0 + rng.uniform(-cfg.scale, cfg.scale)
    tx, ty = rng.uniform(-cfg.translate, cfg.translate, size=2) * size
    contrast = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    brightness = rng.uniform(-cfg.brightness, cfg.brightness)
    return np.array([angle, scale, tx, ty, contrast, brightness], dtype=np.float32)


def affine_matrix(size: int, angle_deg: float, scale: float, tx: float, ty: float) -> tuple[float, ...]:
    """PIL AFFINE data mapping output pixels to input pixels for rotate+scale about the centre, then shift.

    The forward map is p' = s R (p - c) + c + t, so the inverse PIL needs is p = R^T (p' - c - t) / s + c.
    """
    a = np.deg2rad(angle_deg)
    inv = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) / scale
    c = np.array([(size - 1) / 2.0, (size - 1) / 2.0])
    off = c - inv @ (c + np.array([tx, ty]))
    return (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])


def _warp(arr: np.ndarray, data: tuple[float, ...], nearest: bool) -> Image.Image:
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return Image.fromarray(arr).transform(arr.shape[::-1], Image.Transform.AFFINE, data, resample, fillcolor=0)


def intensity_lut(mean: float, contrast: float, brightness: float) -> np.ndarray:
    """The 256-entry uint8 table of v -> clip((v/255 - mean) * contrast + mean + brightness, 0, 1) * 255,
    rounded: a per-pixel map of a uint8 image is one table lookup instead of five float passes."""
    v = np.arange(256, dtype=np.float32) / np.float32(255.0)
    out = np.clip((v - np.float32(mean)) * np.float32(contrast) + np.float32(mean + brightness), 0.0, 1.0)
    return np.rint(out * np.float32(255.0)).astype(np.uint8)


def augment(img: np.ndarray, lung: np.ndarray, inf: np.ndarray, cfg: AugmentConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (H, W) image and 0/1 masks -> the same, augmented alike.

    The image is warped bilinearly, the masks (packed into one image, lung + 2·infection) with
    nearest neighbours; contrast and brightness then act on the warped image through a lookup
    table, so the result stays uint8 (a quarter of the bytes) until the device converts it."""
    angle, scale, tx, ty, contrast, brightness = augment_params(cfg, rng, img.shape[0]).tolist()
    data = affine_matrix(img.shape[0], angle, scale, tx, ty)
    warped = _warp(img, data, False)
    masks = np.asarray(_warp(lung | (inf << 1), data, True))  # one nearest warp for both masks
    mean = float(np.asarray(warped).mean()) / 255.0
    out = np.asarray(warped.point(intensity_lut(mean, contrast, brightness).tolist()), dtype=np.uint8)
    return out, masks & 1, masks >> 1


def augment_batch(img: torch.Tensor, masks: torch.Tensor, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The same augmentation for a batch, on the batch's device.

    img: float (B, 1, H, W) in [0, 1]; masks: float (B, M, H, W) in {0, 1}; params: (B, 6) rows of
    `augment_params` -> augmented img and masks. The geometry is `affine_matrix`'s in normalised
    coordinates (centre 0, side 2): an output point q' samples the input at R(-a)/s · (q' - t).
    """
    B, _, H, W = img.shape
    p = params.to(device=img.device, dtype=torch.float32)
    a = torch.deg2rad(p[:, 0])
    cos, sin = torch.cos(a) / p[:, 1], torch.sin(a) / p[:, 1]
    tx, ty = 2 * p[:, 2] / W, 2 * p[:, 3] / H
    theta = torch.stack([torch.stack([cos, sin, -(cos * tx + sin * ty)], 1),
                         torch.stack([-sin, cos, sin * tx - cos * ty], 1)], 1)  # B, 2, 3
    grid = F.affine_grid(theta, [B, 1, H, W], align_corners=False).to(img.dtype)  # B, H, W, 2
    img = F.grid_sample(img, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    masks = F.grid_sample(masks, grid.to(masks.dtype), mode="nearest", padding_mode="zeros", align_corners=False)
    mean = img.mean(dim=(1, 2, 3), keepdim=True)
    contrast, brightness = p[:, 4].view(B, 1, 1, 1), p[:, 5].view(B, 1, 1, 1)
    return ((img - mean) * contrast + mean + brightness).clamp_(0.0, 1.0), masks

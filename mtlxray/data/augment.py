"""Training augmentation: a mild random affine plus brightness/contrast, identical for image and masks.

There is no horizontal flip: chest anatomy is not left-right symmetric. The randomness of a sample
comes from `sample_rng(seed, epoch, key)`, so it does not depend on stream position or worker count.
"""

from __future__ import annotations

import zlib

import numpy as np
from PIL import Image

from mtlxray.config import AugmentConfig

__all__ = ["sample_rng", "affine_matrix", "augment"]


def sample_rng(seed: int, epoch: int, key: str) -> np.random.Generator:
    """The generator of one sample's augmentation in one epoch."""
    return np.random.default_rng([seed, epoch, zlib.crc32(key.encode())])


def affine_matrix(size: int, angle_deg: float, scale: float, tx: float, ty: float) -> tuple[float, ...]:
    """PIL AFFINE data mapping output pixels to input pixels for rotate+scale about the centre, then shift.

    The forward map is p' = s R (p - c) + c + t, so the inverse PIL needs is p = R^T (p' - c - t) / s + c.
    """
    a = np.deg2rad(angle_deg)
    inv = np.array([[np.cos(a), np.sin(a)], [-np.sin(a), np.cos(a)]]) / scale
    c = np.array([(size - 1) / 2.0, (size - 1) / 2.0])
    off = c - inv @ (c + np.array([tx, ty]))
    return (inv[0, 0], inv[0, 1], off[0], inv[1, 0], inv[1, 1], off[1])


def _warp(arr: np.ndarray, data: tuple[float, ...], nearest: bool) -> np.ndarray:
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    im = Image.fromarray(arr).transform(arr.shape[::-1], Image.Transform.AFFINE, data, resample, fillcolor=0)
    return np.asarray(im, dtype=np.uint8)


def augment(img: np.ndarray, lung: np.ndarray, inf: np.ndarray, cfg: AugmentConfig,
            rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """uint8 (H, W) image and 0/1 masks -> the same, augmented alike.

    Intensity changes are computed in float32 and the image rounded back to uint8, so batches
    stay uint8 (a quarter of the bytes) until the device converts them."""
    size = img.shape[0]
    angle = rng.uniform(-cfg.rotate_deg, cfg.rotate_deg)
    scale = 1.0 + rng.uniform(-cfg.scale, cfg.scale)
    tx, ty = rng.uniform(-cfg.translate, cfg.translate, size=2) * size
    data = affine_matrix(size, angle, scale, tx, ty)
    img, lung, inf = _warp(img, data, False), _warp(lung, data, True), _warp(inf, data, True)
    out = img.astype(np.float32) / 255.0
    mean = float(out.mean())
    contrast = 1.0 + rng.uniform(-cfg.contrast, cfg.contrast)
    brightness = rng.uniform(-cfg.brightness, cfg.brightness)
    out = np.clip((out - mean) * contrast + mean + brightness, 0.0, 1.0)
    return np.rint(out * 255.0).astype(np.uint8), lung, inf

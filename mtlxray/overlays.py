"""Masks blended onto a grayscale X-ray, as uint8 RGB arrays (numpy only): the report's figures,
predict's overlays and the validation images TensorBoard shows during training draw the same way."""

from __future__ import annotations

from typing import Optional

import numpy as np

__all__ = ["LUNG_RGB", "INF_RGB", "MASK_ALPHA", "gray_rgb", "blend", "overlay_rgb", "overlay_row"]

LUNG_RGB = (0.15, 0.75, 0.95)
"""Lung overlay colour (cyan-blue)."""
INF_RGB = (1.0, 0.25, 0.1)
"""Infection overlay colour (red-orange)."""
MASK_ALPHA = {"lung": 0.35, "inf": 0.65, "outside": 0.3}
"""Blend weight per mask; infection is stronger so it stays visible on top of lung; infection
outside the lung (which severity does not count) is faint."""


def gray_rgb(image: np.ndarray) -> np.ndarray:
    """H×W uint8 or float in [0, 1] -> H×W×3 float32 in [0, 1]."""
    img = image.astype(np.float32)
    if image.dtype == np.uint8:
        img = img / 255.0
    return np.repeat(img[..., None], 3, axis=-1)


def blend(rgb: np.ndarray, layers) -> np.ndarray:
    """Blend (mask, colour, alpha) layers in order onto float RGB; returns H×W×3 uint8."""
    for mask, colour, alpha in layers:
        if mask is None:
            continue
        m = np.asarray(mask).astype(bool)[..., None]  # H×W×1
        rgb = np.where(m, (1 - alpha) * rgb + alpha * np.asarray(colour, np.float32), rgb)
    return (rgb.clip(0, 1) * 255).round().astype(np.uint8)


def overlay_rgb(image: np.ndarray, lung: np.ndarray, inf: Optional[np.ndarray]) -> np.ndarray:
    """Blend masks onto a grayscale image: lung in LUNG_RGB, infection in INF_RGB on top.

    image: H×W uint8 or float in [0, 1]; lung, inf: H×W bool/0-1 (inf may be None). Returns H×W×3 uint8.
    """
    return blend(gray_rgb(image), ((lung, LUNG_RGB, MASK_ALPHA["lung"]), (inf, INF_RGB, MASK_ALPHA["inf"])))


def overlay_row(image: np.ndarray, lung_true: Optional[np.ndarray], inf_true: Optional[np.ndarray],
                lung_pred: Optional[np.ndarray], inf_pred: Optional[np.ndarray]) -> np.ndarray:
    """The image, its true masks and its predicted masks side by side: H×3W×3 uint8 (a missing mask
    is left undrawn)."""
    return np.concatenate([blend(gray_rgb(image), ()), overlay_rgb(image, lung_true, inf_true),
                           overlay_rgb(image, lung_pred, inf_pred)], axis=1)

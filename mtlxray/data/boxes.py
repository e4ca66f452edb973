"""Connected components of a binary mask and their bounding boxes (8-connectivity, `scipy.ndimage`).

`scipy.ndimage.label` replaced a hand-written run-based union-find: on 256² infection masks it
measured faster (figures in tests/data/test_boxes.py's benchmark note and the data-layer notes).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

__all__ = ["connected_components", "bounding_boxes"]

_EIGHT = np.ones((3, 3), dtype=bool)


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected components of `mask` (H, W) -> (labels int32 (H, W), count).

    Labels are 1..count in raster order of each component's first pixel; background is 0.
    """
    labels, count = ndimage.label(np.asarray(mask) > 0, structure=_EIGHT, output=np.int32)
    return labels, int(count)


def bounding_boxes(mask: np.ndarray) -> list[list[int]]:
    """Boxes [x0, y0, x1, y1] (x1, y1 exclusive) of each 8-connected component, in label order."""
    mask = np.asarray(mask)
    if not mask.any():
        return []
    labels, _ = connected_components(mask)
    return [[int(sx.start), int(sy.start), int(sx.stop), int(sy.stop)]
            for sy, sx in ndimage.find_objects(labels)]

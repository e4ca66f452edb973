"""Connected components of a binary mask and their bounding boxes (8-connectivity, numpy only)."""

from __future__ import annotations

import numpy as np

__all__ = ["connected_components", "bounding_boxes"]


def _row_runs(row: np.ndarray) -> list[tuple[int, int]]:
    """Half-open [start, end) runs of True in a 1-D bool array."""
    padded = np.concatenate(([False], row, [False])).astype(np.int8)
    edges = np.flatnonzero(np.diff(padded))
    return list(zip(edges[0::2].tolist(), edges[1::2].tolist()))


def _find(parent: list[int], i: int) -> int:
    while parent[i] != i:
        parent[i] = parent[parent[i]]
        i = parent[i]
    return i


def connected_components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """Label the 8-connected components of `mask` (H, W) -> (labels int32 (H, W), count).

    Labels are 1..count in raster order of each component's first pixel; background is 0.
    Works on row runs, so the Python loop is over runs, not pixels.
    """
    fg = np.asarray(mask) > 0
    runs: list[tuple[int, int, int]] = []  # (row, start, end)
    parent: list[int] = []
    prev: list[int] = []  # run indices of the previous row
    for y in range(fg.shape[0]):
        cur = []
        for start, end in _row_runs(fg[y]):
            idx = len(runs)
            runs.append((y, start, end))
            parent.append(idx)
            for j in prev:
                _, ps, pe = runs[j]
                # 8-connectivity: runs touch when they overlap after widening by one pixel.
                if ps <= end and start <= pe:
                    ri, rj = _find(parent, idx), _find(parent, j)
                    if ri != rj:
                        parent[max(ri, rj)] = min(ri, rj)
            cur.append(idx)
        prev = cur
    labels = np.zeros(fg.shape, dtype=np.int32)
    ids: dict[int, int] = {}
    for idx, (y, start, end) in enumerate(runs):
        root = _find(parent, idx)
        labels[y, start:end] = ids.setdefault(root, len(ids) + 1)
    return labels, len(ids)


def bounding_boxes(mask: np.ndarray) -> list[list[int]]:
    """Boxes [x0, y0, x1, y1] (x1, y1 exclusive) of each 8-connected component, in label order."""
    labels, count = connected_components(mask)
    boxes = []
    for lab in range(1, count + 1):
        ys, xs = np.nonzero(labels == lab)
        boxes.append([int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1])
    return boxes

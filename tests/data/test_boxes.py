"""Connected components and infection bounding boxes."""

from collections import deque

import numpy as np

from mtlxray.data.boxes import bounding_boxes, connected_components


def _bfs_components(mask: np.ndarray) -> list[frozenset]:
    """Reference: 8-connected components as sets of pixels, by breadth-first search."""
    seen = np.zeros(mask.shape, bool)
    comps = []
    for y, x in zip(*np.nonzero(mask)):
        if seen[y, x]:
            continue
        comp, queue = set(), deque([(y, x)])
        seen[y, x] = True
        while queue:
            cy, cx = queue.popleft()
            comp.add((cy, cx))
            for dy in (-1, 0, 1):
                for dx in (-1, 0, 1):
                    ny, nx = cy + dy, cx + dx
                    if 0 <= ny < mask.shape[0] and 0 <= nx < mask.shape[1] and mask[ny, nx] and not seen[ny, nx]:
                        seen[ny, nx] = True
                        queue.append((ny, nx))
        comps.append(frozenset(comp))
    return comps


def test_components_match_breadth_first_search_on_random_masks():
    rng = np.random.default_rng(0)
    for density in (0.2, 0.4, 0.6):
        mask = rng.random((40, 33)) < density
        labels, count = connected_components(mask)
        ours = {frozenset(zip(*np.nonzero(labels == k))) for k in range(1, count + 1)}
        assert ours == set(_bfs_components(mask))
        assert ((labels > 0) == mask).all()


def test_diagonal_neighbours_are_one_component():
    mask = np.eye(6, dtype=bool)
    assert connected_components(mask)[1] == 1


def test_bounding_boxes_are_half_open_xyxy():
    mask = np.zeros((10, 12), np.uint8)
    mask[2:5, 3:7] = 1
    mask[8, 10] = 1
    assert bounding_boxes(mask) == [[3, 2, 7, 5], [10, 8, 11, 9]]


def test_empty_mask_has_no_boxes():
    assert bounding_boxes(np.zeros((8, 8), np.uint8)) == []

"""The paper's published numbers, in one place: dataset counts (Tables I and II) and parameter counts.

Everything that compares against the paper (the synthetic `paper` scale, `model-summary`, the
demo report, the projection benchmark) reads them from here.
"""

from __future__ import annotations

from mtlxray import CLASS_NAMES

__all__ = ["TABLE_I", "TABLE_II", "SPLITS", "SUBSET_COUNTS", "subset_total", "PART_PARAMS"]

SPLITS = ("train", "val", "test")

TABLE_I: dict[str, tuple[int, int, int]] = {
    "Normal": (6849, 1712, 2140), "Non-COVID": (7208, 1802, 2253), "COVID-19": (7658, 1903, 2395)}
"""COVID-QU-Ex lung segmentation subset: class -> (train, val, test) images (33,920 in all)."""

TABLE_II: dict[str, tuple[int, int, int]] = {
    "Normal": (932, 233, 291), "Non-COVID": (932, 233, 292), "COVID-19": (1864, 466, 583)}
"""COVID-QU-Ex infection segmentation subset: class -> (train, val, test) images (5,826 in all)."""

SUBSET_COUNTS: dict[str, dict[str, dict[str, int]]] = {
    subset: {split: {c: table[c][i] for c in CLASS_NAMES} for i, split in enumerate(SPLITS)}
    for subset, table in (("lung", TABLE_I), ("infection", TABLE_II))
}
"""subset -> split -> class -> images, as the shard manifests count them."""


def subset_total(subset: str) -> int:
    """Images in one of the paper's subsets (lung: 33,920; infection: 5,826)."""
    return sum(n for split in SUBSET_COUNTS[subset].values() for n in split.values())


PART_PARAMS: dict[str, float] = {
    "encoder": 27.52e6,
    "ppm": 1.78e6,
    "decoders": 14.77e6,
    "lung_head": 10.44e3,
    "infection_head": 10.44e3,
    "cls_head": 2.18e3,
    "total": 44.09e6,
}
"""The paper's parameter count of each part of the multi-task Swin-UNet."""

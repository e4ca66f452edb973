"""A tiny synthetic shard set for the tests of every layer (test-only; not part of the package)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

from mtlxray.data.shards import build_shards
from mtlxray.data.synth import synthesize

__all__ = ["make_tiny_shards", "write_png"]


def make_tiny_shards(tmp_dir: str | Path, format: str = "raw", image_size: int = 256, seed: int = 0,
                     shard_size: int = 4) -> Path:
    """Synthesise the `tiny` scale under tmp_dir/tree and shard it into tmp_dir/shards; returns the shard root.

    Small shards (default 4 samples) give several, uneven shards per split. Reuses an existing build.
    """
    tmp_dir = Path(tmp_dir)
    tree, out = tmp_dir / "tree", tmp_dir / "shards"
    if not (tree / "Lung Segmentation Data").is_dir():
        synthesize(tree, "tiny", seed=seed, size=image_size, workers=1, progress=False)
    build_shards(tree, out, format=format, shard_size=shard_size, workers=1, image_size=image_size,
                 progress=False)
    return out


def write_png(path: str | Path, array: np.ndarray) -> None:
    """Write a uint8 array as PNG (L or RGB by shape), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path)

"""Session fixtures: one tiny synthetic tree and its shards, built once and shared by the data tests."""

from pathlib import Path

import numpy as np
import pytest

from tiny_data import make_tiny_shards, write_png

SIZE = 64  # small images keep the suite fast; the builder keeps this size (no resize)


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    """Raw-format shards (4 samples per shard, so splits have uneven shards)."""
    return make_tiny_shards(tmp_path_factory.mktemp("tiny_raw"), format="raw", image_size=SIZE)


@pytest.fixture(scope="session")
def tiny_tree(tiny_shards) -> Path:
    """The synthetic COVID-QU-Ex tree the raw shards were built from."""
    return tiny_shards.parent / "tree"


@pytest.fixture(scope="session")
def tiny_shards_png(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("tiny_png"), format="png", image_size=SIZE)


@pytest.fixture
def mini_qu_ex(tmp_path) -> Path:
    """A hand-made COVID-QU-Ex tree: lung subset, Train, 2 images per class at 32 px, masks 0/255."""
    rng = np.random.default_rng(0)
    top = "Lung Segmentation Data"
    for c, stem in (("Normal", "Normal ({})"), ("Non-COVID", "non_COVID ({})"), ("COVID-19", "covid_{}")):
        for i in (1, 2):
            folder = tmp_path / top / top / "Train" / c
            name = stem.format(i) + ".png"
            write_png(folder / "images" / name, rng.integers(0, 256, (32, 32), dtype=np.uint8))
            mask = np.zeros((32, 32), np.uint8)
            mask[4:28, 3 + i:14] = 255
            write_png(folder / "lung masks" / name, mask)
    return tmp_path


@pytest.fixture
def radiography_tree(tmp_path) -> Path:
    """A hand-made Radiography DB tree: 10 images per class at 299 px with 256 px masks (as released)."""
    rng = np.random.default_rng(1)
    for c in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"):
        for i in range(1, 11):
            write_png(tmp_path / c / "images" / f"{c}-{i}.png", rng.integers(0, 256, (299, 299), dtype=np.uint8))
            mask = np.zeros((256, 256), np.uint8)
            mask[40:200, 30:120] = 255
            write_png(tmp_path / c / "masks" / f"{c}-{i}.png", mask)
    return tmp_path

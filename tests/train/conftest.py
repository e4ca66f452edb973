"""Fixtures for the training tests: tiny shards once per session and a tiny CPU config."""

from __future__ import annotations

from pathlib import Path

import pytest

from _train_support import DEMO, DEMO2, tiny_overrides
from mtlxray.config import Config, load_config


@pytest.fixture(scope="session")
def tiny_shards(tmp_path_factory) -> Path:
    from tiny_data import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("train-shards"), format="raw", image_size=64)


@pytest.fixture
def tiny_cfg(tiny_shards, tmp_path):
    """Factory: a validated tiny Config (phase 1 unless `phase2=True`) writing under tmp_path."""

    def make(*extra: str, phase2: bool = False, name: str = "t") -> Config:
        return load_config(DEMO2 if phase2 else DEMO, tiny_overrides(tiny_shards, tmp_path, *extra, name=name))

    return make

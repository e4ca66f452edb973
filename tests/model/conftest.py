"""Tiny model configs shared by the model tests (the full model is only constructed, never trained)."""

from __future__ import annotations

import pytest

from _model_support import tiny_config
from mtlxray.config import ModelConfig


@pytest.fixture
def tiny_cfg() -> ModelConfig:
    return tiny_config()

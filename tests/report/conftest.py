"""A tiny, randomly initialised model saved in the training checkpoint layout."""

from pathlib import Path

import pytest

from _report_support import TINY_MODEL, write_checkpoint  # noqa: F401  (TINY_MODEL: used by tests here)

@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt2"), "phase2")


@pytest.fixture(scope="session")
def tiny_ckpt_phase1(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("ckpt1"), "phase1")

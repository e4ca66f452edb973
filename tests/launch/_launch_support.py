"""Helpers shared by the launch tests."""

from __future__ import annotations

import json
import time
from pathlib import Path


def train_records(metrics: Path) -> list[dict]:
    """Complete `train` lines of a metrics.jsonl that may still be growing."""
    if not metrics.exists():
        return []
    lines = metrics.read_text().split("\n")[:-1]
    return [r for r in map(json.loads, lines) if r["type"] == "train"]


def train_steps(metrics: Path) -> list[int]:
    return [r["step"] for r in train_records(metrics)]


def wait_for_steps(metrics: Path, n: int, timeout: float) -> None:
    """Wait until training has logged `n` steps to metrics.jsonl."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(train_steps(metrics)) < n:
        time.sleep(0.2)
    assert len(train_steps(metrics)) >= n, f"{metrics}: fewer than {n} steps after {timeout:.0f}s"

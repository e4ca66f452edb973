"""Helpers shared by the launch tests."""

from __future__ import annotations

import json
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

TINY_RUN = [
    "model.embed_dim=12", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,2,2]", "model.ppm_bins=[1,2]",
    "model.ppm_channels=16", "model.decoder_channels=[24,16,12,8]", "model.cross_attn_heads=[2,1,1,1]",
    "model.head_channels=8", "model.cls_channels=8",
    "data.batch_size=2", "data.eval_batch_size=4", "data.workers=0", "data.shuffle_buffer=8",
    "schedule.warmup_steps=0", "run.log_every=1", "run.save_every=1000", "run.tensorboard=false",
    "run.progress=false",
]
"""Overrides that shrink configs/demo*.yaml (model too) to a CPU job of a few seconds per step."""


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

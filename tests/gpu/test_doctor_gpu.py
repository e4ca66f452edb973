"""`mtlxray doctor` on a GPU node passes configs/phase1.yaml (its shards replaced by a tiny set
built at 256²), and reports the card, its bf16 and the memory projection against it."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

from _gpu_support import CONFIGS, run, requires_gpu

pytestmark = requires_gpu


@pytest.fixture(scope="module")
def shards_256(tmp_path_factory) -> Path:
    from tiny_data import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("gpu-doctor-shards"), format="raw", image_size=256)


def test_doctor_passes_phase1_on_the_gpu_node(shards_256, tmp_path):
    args = ["--config", str(CONFIGS / "phase1.yaml"), f"data.shards={shards_256}", f"run.output_dir={tmp_path}"]
    text = run([sys.executable, "-m", "mtlxray.cli", "doctor", *args], timeout=900)
    assert text.returncode == 0, text.stdout + text.stderr
    name = torch.cuda.get_device_name(0)
    assert f"gpu 0: {name}" in text.stdout and "bf16 yes" in text.stdout
    assert "NCCL" in text.stdout and "n/a (no GPU)" not in text.stdout
    assert "memory (PROJECTION)" in text.stdout
    res = run([sys.executable, "-m", "mtlxray.cli", "doctor", "--json", *args], timeout=900)
    report = json.loads(res.stdout)
    assert report["ok"] and report["gpus"][0]["bf16"]
    assert not [p for p in report["problems"] if p["level"] == "error"]
    # every window-attention shape of the model ran under SDPA on the GPU, in bf16
    assert report["sdpa"] and all(r["dtype"] == "bf16" and any(r["accepts"].values()) for r in report["sdpa"])
    assert report["memory"]["cards"][name]["fits"]  # phase 1 at batch 16 fits an 80 GB card by far
    print("\n" + text.stdout)

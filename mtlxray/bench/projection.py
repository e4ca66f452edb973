"""`projection`: a PROJECTION, not a measurement. From the FLOPs counted per image (forward +
backward, each phase's trainable set), the images/s one H100 would reach at 40% MFU of its bf16
dense peak, the wall time of both training phases on 1, 8 and 32 GPUs at linear scaling, and the
loader cores each GPU needs at the per-core rate the `loader` suite measured on this machine."""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from mtlxray.bench.common import Context, SuiteResult, count_flops
from mtlxray.bench.workloads import TINY, ours, train_step

H100_BF16_DENSE_FLOPS = 989e12
MFU = 0.40
PHASES = {"phase1": (50, 21_715), "phase2": (30, 3_728)}
"""phase -> (epochs, training images per epoch)."""
GPUS = (1, 8, 32)


def flops_per_image(phase: str, smoke: bool) -> int:
    """FLOPs of one training step (fwd+bwd) per image, counted at batch 2 (batch norm after the
    1x1 pyramid pool needs two values in training mode; FLOPs scale linearly with the batch)."""
    model = ours(TINY if smoke else [], phase=phase).train()
    size = model_img_size(smoke)
    return count_flops(train_step(model, torch.rand(2, 1, size, size))) // 2


def model_img_size(smoke: bool) -> int:
    return 64 if smoke else 256


def _loader_rates(out: Path) -> dict[str, float]:
    """Per-core training-loader rates measured by the loader suite ({} when it has not run)."""
    path = out / "loader.json"
    if not path.is_file():
        return {}
    data = json.loads(path.read_text())
    return data.get("details", {}).get("per_core_training_rate", {}) if data.get("status") == "ok" else {}


def run(ctx: Context) -> SuiteResult:
    result = SuiteResult("projection", label="PROJECTION (not a measurement)")
    loader = _loader_rates(ctx.out)
    per_gpu_rate = {}
    for phase, (epochs, images) in PHASES.items():
        flops = flops_per_image(phase, ctx.smoke)
        img_s = H100_BF16_DENSE_FLOPS * MFU / flops
        per_gpu_rate[phase] = img_s
        for n in GPUS:
            hours = epochs * images / (img_s * n) / 3600
            result.rows.append({"phase": phase, "gpus": n, "GFLOP/img": flops / 1e9, "img/s/gpu": img_s,
                                "img/s": img_s * n, "epochs": epochs, "images/epoch": images,
                                "wall_h": hours, "wall_min": hours * 60})
    cores = {name: {phase: math.ceil(rate / r) for phase, rate in per_gpu_rate.items()}
             for name, r in loader.items() if r > 0}
    result.details = {
        "assumptions": {
            "peak_flops": H100_BF16_DENSE_FLOPS, "mfu": MFU, "scaling": "linear in GPUs (no eval, no I/O stalls)",
            "flops": "torch.utils.flop_counter FLOPs of fwd+bwd; phase1 with the infection branch frozen",
        },
        "loader_cores_per_gpu": cores,
        "loader_per_core_rate_source": "loader.json (this machine)" if loader else "loader suite not run",
    }
    return result

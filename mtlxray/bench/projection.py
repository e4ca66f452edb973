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
from mtlxray.bench.gpus import bf16_dense_peak
from mtlxray.bench.workloads import TINY, ours, train_step
from mtlxray.paper import SUBSET_COUNTS

H100_BF16_DENSE_FLOPS = bf16_dense_peak("NVIDIA H100 80GB HBM3")
MFU = 0.40
PHASES = {"phase1": (50, sum(SUBSET_COUNTS["lung"]["train"].values())),
          "phase2": (30, sum(SUBSET_COUNTS["infection"]["train"].values()))}
"""phase -> (epochs as in configs/phase*.yaml, training images per epoch from the paper's tables)."""
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


def project_phase(flops_per_image: float, epochs: int, images: int, gpus: int, *,
                  peak_flops: float = H100_BF16_DENSE_FLOPS, mfu: float = MFU) -> dict:
    """Images/s per GPU at `mfu` of `peak_flops`, and the wall time of `epochs` × `images` on
    `gpus` GPUs at linear scaling."""
    img_s = peak_flops * mfu / flops_per_image
    hours = epochs * images / (img_s * gpus) / 3600
    return {"img/s/gpu": img_s, "img/s": img_s * gpus, "wall_h": hours, "wall_min": hours * 60}


def loader_cores(per_gpu_rate: dict[str, float], per_core_rate: dict[str, float]) -> dict[str, dict[str, int]]:
    """Loader cores each GPU needs, per loader pipeline and phase: its images/s over one core's rate."""
    return {name: {phase: math.ceil(rate / r) for phase, rate in per_gpu_rate.items()}
            for name, r in per_core_rate.items() if r > 0}


def run(ctx: Context) -> SuiteResult:
    result = SuiteResult("projection", label="PROJECTION (not a measurement)")
    loader = _loader_rates(ctx.out)
    per_gpu_rate = {}
    for phase, (epochs, images) in PHASES.items():
        flops = flops_per_image(phase, ctx.smoke)
        for n in GPUS:
            p = project_phase(flops, epochs, images, n)
            per_gpu_rate[phase] = p["img/s/gpu"]
            result.rows.append({"phase": phase, "gpus": n, "GFLOP/img": flops / 1e9, "img/s/gpu": p["img/s/gpu"],
                                "img/s": p["img/s"], "epochs": epochs, "images/epoch": images,
                                "wall_h": p["wall_h"], "wall_min": p["wall_min"]})
    result.details = {
        "assumptions": {
            "peak_flops": H100_BF16_DENSE_FLOPS, "mfu": MFU, "scaling": "linear in GPUs (no eval, no I/O stalls)",
            "flops": "torch.utils.flop_counter FLOPs of fwd+bwd; phase1 with the infection branch frozen",
        },
        "loader_cores_per_gpu": loader_cores(per_gpu_rate, loader),
        "loader_per_core_rate_source": "loader.json (this machine)" if loader else "loader suite not run",
    }
    return result

"""`memory`: activation memory MEASURED per image for each checkpointing mode, and per-GPU memory
PROJECTED from it for the paper configs on 80 GB and 141 GB cards.

The measurement and the projection are `mtlxray.memory_plan`'s, which `mtlxray doctor` uses too.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

from mtlxray.bench.common import Context, SuiteResult
from mtlxray.memory_plan import (ALLOCATOR_MARGIN, BACKENDS, CARDS, CHECKPOINT_MODES, DS_BUCKET_DEFAULT,
                                 RUNTIME_BYTES, ActivationBytes, max_batch, measure_activations, model_params,
                                 project, state_bytes)

__all__ = ["BATCHES", "PLAN_GPUS", "SMOKE_MODEL", "paper_config", "run"]

BATCHES = (8, 16, 32, 64)
PLAN_GPUS = 8
"""GPUs of the paper configs (configs/phase1.yaml: 1 node × 8)."""


# ---------------------------------------------------------------------------------------------
# the suite

_GiB = 2**30
_MiB = 2**20


SMOKE_MODEL = ["model.img_size=32", "model.embed_dim=12", "model.depths=[2,2]", "model.num_heads=[1,2]",
               "model.window_size=4", "model.ppm_bins=[1,2]", "model.ppm_channels=8", "model.decoder_channels=[16,8]",
               "model.cross_attn_heads=[1,1]", "model.head_channels=8", "model.cls_channels=8"]
"""Two stages of two blocks (a shifted one with its mask) at 32²: every part, counted in seconds."""


def paper_config(phase: str, smoke: bool = False, *extra: str):
    """The paper's model and phase (defaults; phase 1 freezes the infection branch); SMOKE_MODEL for smoke."""
    from mtlxray.config import load_config

    frozen = "[inf_decoder,inf_head]" if phase == "phase1" else "[]"
    return load_config(None, [f"phase.name={phase}", f"phase.frozen={frozen}", *(SMOKE_MODEL if smoke else []),
                              *extra])


def _measurement_row(a: ActivationBytes) -> dict:
    return {
        "phase": a.phase, "grad_checkpoint": a.grad_checkpoint, "dtype": a.precision, "img": a.img_size,
        "retained_MiB/img": a.per_image() / _MiB, "retained_fixed_MiB": a.fixed() / _MiB,
        "bwd_peak_MiB/img": a.per_image("backward_peak") / _MiB,
        "saved_hooks_MiB/img": a.per_image("saved_by_hooks") / _MiB,
        "attn_NxN_MiB/img": a.per_image("attention_matrices") / _MiB,
    }


def _plan_tables(acts: Iterable[ActivationBytes], params: dict[str, tuple[int, int]], gpus: int) -> tuple[dict, list]:
    grid, by_mode = [], []
    for a in acts:
        p, t = params[a.phase]
        row = {"phase": a.phase, "grad_checkpoint": a.grad_checkpoint}
        for b in BATCHES:
            for backend in BACKENDS:
                proj = project(a, b, backend, gpus, p, t)
                grid.append({"phase": a.phase, "grad_checkpoint": a.grad_checkpoint, "backend": backend,
                             "gpus": gpus, "batch": b, **{k: v / _GiB for k, v in proj.items()},
                             **{f"fits_{c}": proj["total"] <= cap for c, cap in CARDS.items()}})
            row[f"b{b}_GiB"] = project(a, b, "ddp", gpus, p, t)["total"] / _GiB
        for c, cap in CARDS.items():
            row[f"max_batch_{c}"] = max_batch(a, cap, "ddp", gpus, p, t)
        by_mode.append(row)
    state_rows = []
    for phase, (p, t) in params.items():
        for backend in BACKENDS:
            s = state_bytes(backend, gpus, p, t)
            state_rows.append({"phase": phase, "backend": backend, **{f"{k}_GiB": v / _GiB for k, v in s.items()}})
    tables = {
        f"PROJECTION (not a measurement): per-GPU memory, GiB, DDP over {gpus} GPUs, bf16 autocast, "
        f"256² (largest batch fitting each card on the right)": by_mode,
        f"PROJECTION: model state per GPU by backend, GiB, {gpus} GPUs": state_rows,
    }
    return tables, grid


def run(ctx: Context) -> SuiteResult:
    batches = (2, 4)
    result = SuiteResult("memory", label="activations measured on CPU (fake tensors); per-GPU memory PROJECTED")
    acts, params = [], {}
    for phase in ("phase1", "phase2"):
        cfg = paper_config(phase, ctx.smoke)
        for a in measure_activations(cfg, precision="bf16", batches=batches, modes=CHECKPOINT_MODES):
            acts.append(a)
            result.rows.append(_measurement_row(a))
        params[phase] = model_params(cfg)
    tables, grid = _plan_tables(acts, params, PLAN_GPUS)
    result.details = {
        "tables": tables,
        "projection": grid,
        "activations": [dataclasses.asdict(a) for a in acts],
        "params": {ph: {"all": p, "trainable": t} for ph, (p, t) in params.items()},
        "cards_bytes": CARDS,
        "assumptions": {
            "runtime_bytes": RUNTIME_BYTES, "allocator_margin": ALLOCATOR_MARGIN,
            "deepspeed_reduce_bucket_elements": DS_BUCKET_DEFAULT, "gpus": PLAN_GPUS,
            "activations": "max(retained after forward, backward peak), linear in the batch from batches "
                           f"{batches}; CPU autocast's dtype choices (CUDA autocast keeps LayerNorm outputs in "
                           "fp32, which the GPU test compares against max_memory_allocated)",
            "attention": "the kernel `model.attention: auto` picks on a GPU (SDPA); with 5-D window tensors its "
                         "math path keeps the N×N probabilities (column attn_NxN)",
        },
    }
    return result

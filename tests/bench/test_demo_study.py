"""benchmarks/demo_study.py: the table it prints from finished demo runs (the runs themselves take
minutes each, so this checks the tabulation on recorded rows)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _study():
    spec = importlib.util.spec_from_file_location("demo_study", REPO / "benchmarks" / "demo_study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _row(config, precision, seed, acc, rc=0):
    return {"config": config, "precision": precision, "seed": seed, "rc": rc, "train_s": 100.0 + seed,
            "lung/lung_dice": 0.97, "lung/accuracy": acc, "infection/inf_dice": 0.7,
            "infection/accuracy": acc, "infection/inf_fp_share": 1.0}


def test_render_gives_mean_and_sd_per_config_and_precision_and_names_failed_runs():
    study = _study()
    rows = [_row("demo", "fp32", 0, 0.8), _row("demo", "fp32", 1, 0.9), _row("demo", "bf16", 0, 0.6),
            {"config": "demo", "precision": "bf16", "seed": 1, "rc": 1, "error": "MtlxError: boom"}]
    table = study.render(rows).splitlines()
    fp32 = next(line for line in table if line.startswith("| **demo** | **fp32**"))
    bf16 = next(line for line in table if line.startswith("| **demo** | **bf16**"))
    assert "mean ± sd (2)" in fp32 and "0.850 ± 0.071" in fp32  # accuracy over seeds 0 and 1
    assert "mean ± sd (1)" in bf16 and "0.600 ± 0.000" in bf16  # the failed run is left out
    assert any("failed: MtlxError: boom" in line for line in table)

"""Shared helpers of the training tests: paths, the tiny model, and running the CLI."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "configs" / "demo.yaml"
DEMO2 = REPO / "configs" / "demo_phase2.yaml"

# A model small enough that a training step takes a few tens of milliseconds on one core.
TINY_MODEL = [
    "model.img_size=64", "model.embed_dim=12", "model.depths=[1,1]", "model.num_heads=[1,2]",
    "model.window_size=4", "model.ppm_channels=16", "model.ppm_bins=[1,2]",
    "model.decoder_channels=[16,8]", "model.cross_attn_heads=[1,1]", "model.head_channels=8",
    "model.cls_channels=8", "model.drop_path_rate=0.1",
]


def tiny_overrides(shards: Path, out: Path, *extra: str, name: str = "t") -> list[str]:
    """Overrides turning the demo config into a few-second fp32 run writing under `out`."""
    return [
        f"data.shards={shards}", "data.batch_size=2", "data.eval_batch_size=4", "data.workers=0",
        "data.shuffle_buffer=8", *TINY_MODEL, f"run.output_dir={out}", f"run.name={name}",
        "run.precision=fp32", "run.tensorboard=false", "run.progress=false", "run.log_every=1",
        "run.eval_every=0", "run.save_every=1000", "schedule.warmup_steps=1", *extra,
    ]


LOG_LINE = re.compile(r"^(\d\d:\d\d:\d\d (DEBUG|INFO|WARNING) |\[)")
"""A log record (ours, or DeepSpeed's bracketed ones), as opposed to the CLI's error line."""


def error_lines(stderr: str) -> list[str]:
    """stderr without log records: what the CLI itself printed."""
    return [line for line in stderr.splitlines() if line.strip() and not LOG_LINE.match(line)]


def cli_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"MTLXRAY_PG_TIMEOUT_S": "120", "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"})
    env.pop("ACCELERATE_USE_CPU", None)
    return env


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m mtlxray.cli ARGS` in a fresh process."""
    return subprocess.run([sys.executable, "-m", "mtlxray.cli", *args], cwd=REPO, env=env or cli_env(),
                          capture_output=True, text=True, timeout=timeout)


class HostReads(torch.overrides.TorchFunctionMode):
    """Counts the operations that make the host wait for a device tensor's value."""

    READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "cpu", "numpy", "nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        bool_index = name in ("__getitem__", "__setitem__") and any(
            torch.is_tensor(a) and a.dtype == torch.bool for a in (args[1] if isinstance(args[1], tuple) else (args[1],)))
        if name in self.READS or bool_index:
            self.count += 1
        return func(*args, **(kwargs or {}))


def host_reads_per_step(cfg) -> dict[int, int]:
    """Train `cfg` (steps 1..max_steps) counting host reads; {step k: reads between the progress
    updates of steps k-1 and k} for k = 2..max_steps-1: step k-1's bookkeeping (its log line when it
    is a log step) plus step k's forward, backward and update."""
    from mtlxray.train.trainer import Trainer

    trainer = Trainer(cfg, "none")
    counts: list[tuple[int, int]] = []
    try:
        update = trainer.progress.update  # called once per optimizer step, with the step done

        def counted_update(step: int) -> None:
            counts.append((step, mode.count))
            update(step)

        trainer.progress.update = counted_update
        with HostReads() as mode:
            trainer.fit()
    finally:
        trainer.close()
    steps = dict(counts)
    return {k: steps[k] - steps[k - 1] for k in range(2, cfg.schedule.max_steps)}

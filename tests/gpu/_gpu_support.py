"""Shared by the GPU tests: the skip rule, paths, tiny training overrides and running the CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
CONFIGS = REPO / "configs"
PROBE = Path(__file__).with_name("_train_probe.py")

requires_gpu = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (torch.cuda.is_available() is False)"),
]
"""`pytestmark` of every GPU test module: marked `gpu` (run by `make test-gpu`), skipped without CUDA."""

# A model whose training step takes milliseconds on a GPU; every part of the paper's model present.
TINY_MODEL = [
    "model.img_size=64", "model.embed_dim=24", "model.depths=[2,2]", "model.num_heads=[1,2]",
    "model.window_size=4", "model.ppm_channels=16", "model.ppm_bins=[1,2]", "model.decoder_channels=[16,8]",
    "model.cross_attn_heads=[1,1]", "model.head_channels=8", "model.cls_channels=8", "model.drop_path_rate=0.1",
]


def train_overrides(shards: Path, out: Path, name: str, *extra: str) -> list[str]:
    """configs/demo.yaml turned into a short bf16 GPU run on the tiny shards, writing under `out`."""
    return [f"data.shards={shards}", "data.batch_size=4", "data.eval_batch_size=8", "data.workers=0",
            "data.shuffle_buffer=8", *TINY_MODEL, f"run.output_dir={out}", f"run.name={name}",
            "run.precision=bf16", "run.tensorboard=false", "run.progress=false", "run.log_every=1",
            "run.eval_every=0", "run.save_every=1000", "schedule.warmup_steps=1", *extra]


def env(**extra: str) -> dict[str, str]:
    path = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    e = {**os.environ, "PYTHONPATH": path, "PYTHONUNBUFFERED": "1", "MTLXRAY_PG_TIMEOUT_S": "300", **extra}
    e.pop("ACCELERATE_USE_CPU", None)
    return e


def run(cmd: list[str], timeout: float = 900, **env_extra: str) -> subprocess.CompletedProcess:
    import killable

    return killable.run(cmd, cwd=REPO, env=env(**env_extra), timeout=timeout)


def probe(record: Path, *cli_args: str, torchrun: bool = False, timeout: float = 900,
          **env_extra: str) -> subprocess.CompletedProcess:
    """`mtlxray CLI_ARGS` through tests/gpu/_train_probe.py (which records the process group, DDP and
    DeepSpeed it saw into `record`), plainly or under torchrun with one process."""
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1"] \
        if torchrun else [sys.executable]
    return run([*launcher, str(PROBE), str(record), *cli_args], timeout=timeout, **env_extra)

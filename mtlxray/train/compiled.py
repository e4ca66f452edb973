"""`run.compile`: the model's forward and the loss under torch.compile, each one whole graph.

The forward is compiled by accelerate in `prepare()` (after DDP wraps the model, so dynamo's
DDPOptimizer splits the graph at DDP's gradient buckets and all-reduces overlap backward); the
loss is compiled here with the same options. The model builds its window layouts and masks as
buffers outside forward, so neither graph breaks (tests/train/test_compiled.py counts the breaks
with `torch._dynamo.explain`). DeepSpeed's engine runs eager: its hooks and partitioned
parameters are outside what this project compiles and tests.
"""

from __future__ import annotations

import logging
from typing import Callable, Optional

import torch

from mtlxray.config import Config, RunConfig

__all__ = ["compiles", "compile_options", "dynamo_plugin", "compile_loss"]

log = logging.getLogger(__name__)


def compiles(cfg: Config) -> bool:
    """Whether this run compiles: run.compile, on the DDP backend (DeepSpeed stays eager)."""
    return cfg.run.compile and cfg.run.backend == "ddp"


def compile_options(run: RunConfig, backend: str = "inductor") -> dict:
    """Keyword arguments of torch.compile for run.compile_mode (`default` is torch's own None)."""
    mode: Optional[str] = None if run.compile_mode == "default" else run.compile_mode
    return {"backend": backend, "mode": mode}


def dynamo_plugin(cfg: Config):
    """accelerate's TorchDynamoPlugin for this run: inductor in run.compile_mode, or none."""
    from accelerate.utils import TorchDynamoPlugin

    if cfg.run.compile and not compiles(cfg):
        log.warning("run.compile: DeepSpeed runs eager (run.backend=deepspeed); compiling applies to DDP")
    if not compiles(cfg):
        return TorchDynamoPlugin(backend="no")
    return TorchDynamoPlugin(**compile_options(cfg.run))


def compile_loss(loss_fn: Callable, cfg: Config, backend: str = "inductor") -> Callable:
    """`loss_fn` compiled with the run's options when the run compiles, else `loss_fn` itself."""
    return torch.compile(loss_fn, **compile_options(cfg.run, backend)) if compiles(cfg) else loss_fn

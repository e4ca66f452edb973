"""The Accelerator for a run (DDP or DeepSpeed), with the CPU traps of accelerate/DeepSpeed handled.

Who this process is comes from `mtlxray.dist`; this module turns it into a process group.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import torch

from mtlxray.config import Config
from mtlxray.dist import export_torch_env, process_group_kwargs, resolve_world
from mtlxray.errors import ConfigError
from mtlxray.resources import find_config
from mtlxray.train.compiled import dynamo_plugin
from mtlxray.train.logs import build_trackers

__all__ = ["build_accelerator", "deepspeed_config", "keep_deepspeed_collectives_on_gloo",
           "keep_grads_in_parameter_layout"]

logger = logging.getLogger(__name__)


def deepspeed_config(cfg: Config) -> dict:
    """The run's DeepSpeed JSON with `auto` values filled from the config.

    bf16 goes through DeepSpeed's `torch_autocast` (fp32 master weights), never its `bf16` mode.
    """
    if not cfg.run.deepspeed_config:
        raise ConfigError("run.backend=deepspeed needs run.deepspeed_config (e.g. configs/deepspeed/zero2.json)")
    path = find_config(cfg.run.deepspeed_config, "run.deepspeed_config")
    try:
        ds = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"run.deepspeed_config: {path}: invalid JSON: {e}") from None
    fill = {
        "train_micro_batch_size_per_gpu": cfg.data.batch_size,
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
    }
    for key, value in fill.items():
        if ds.get(key, "auto") == "auto":
            ds[key] = value
    ds.pop("train_batch_size", None)
    ds.pop("bf16", None)
    ds.pop("fp16", None)
    ds["torch_autocast"] = {"enabled": cfg.run.precision == "bf16", "dtype": "bfloat16"}
    return ds


def _neutralise_transformers_hook() -> None:
    """accelerate's DeepSpeedPlugin imports transformers unconditionally; skip that hook if absent.

    The hook only registers the plugin with transformers' ZeRO-3 integration, which is unused here.
    """
    import importlib.util

    from accelerate.utils import DeepSpeedPlugin

    if importlib.util.find_spec("transformers") is None:
        DeepSpeedPlugin.set_deepspeed_weakref = lambda self: None


def keep_deepspeed_collectives_on_gloo() -> None:
    """Stop DeepSpeed on CPU from replacing gloo's all-reduce with its shared-memory kernel.

    At its first init, deepspeed.comm JIT-compiles `deepspeed_shm_comm` and routes CPU all-reduces
    through /dev/shm segments that the ranks busy-wait on. When a segment or the ISA-specific
    kernel fails (a small or read-only /dev/shm, a stale segment of a killed run), the peers spin
    at 100% CPU forever instead of raising, and the process-group timeout never fires. gloo fails
    with a timeout and costs little at CPU scale. DeepSpeed has no switch for this, so mark the op
    incompatible, which is what its loader checks (deepspeed/comm/torch.py, build_shm_op).
    """
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def keep_grads_in_parameter_layout(model: torch.nn.Module) -> None:
    """Give every trainable parameter's gradient the parameter's own strides, before DDP sees it.

    oneDNN's convolution backward returns weight gradients whose strides differ from the weight's
    in size-1 dimensions (a 1×1 kernel, a depthwise kernel's single input channel): the same
    memory layout, but DDP compares strides exactly, warns "grad strides do not match bucket view
    strides" and takes its slow copy path for those parameters every step. Re-striding such a
    gradient is free (a view); one with a really different layout is made contiguous.
    """
    def hook(p: torch.nn.Parameter):
        def restride(grad: torch.Tensor) -> torch.Tensor:
            if grad.stride() == p.stride():
                return grad
            same = all(g == q for g, q, n in zip(grad.stride(), p.stride(), p.shape) if n > 1)
            return grad.as_strided(p.shape, p.stride()) if same else grad.contiguous()
        return restride

    for p in model.parameters():
        if p.requires_grad:
            p.register_hook(hook(p))


def build_accelerator(cfg: Config, run_dir: Path):
    """An Accelerator for cfg.run.backend/precision on this machine (GPU: nccl; CPU: gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import (DDPCommunicationHookType, DeepSpeedPlugin, DistributedDataParallelKwargs,
                                  ProjectConfiguration)

    world = resolve_world()
    distributed = world.world_size > 1 or cfg.run.backend == "deepspeed"
    export_torch_env(world, force=distributed)
    on_gpu = torch.cuda.is_available()
    pg = process_group_kwargs(world, force=distributed)
    hook = {"fp32": DDPCommunicationHookType.NO, "fp16": DDPCommunicationHookType.FP16,
            "bf16": DDPCommunicationHookType.BF16}[cfg.run.grad_allreduce]
    kwargs: dict = {
        "kwargs_handlers": [pg, DistributedDataParallelKwargs(comm_hook=hook)],
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        # The loop steps the scheduler once per optimizer step itself; accelerate would otherwise
        # step it once per process.
        "step_scheduler_with_optimizer": False,
        "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        "log_with": build_trackers(cfg, run_dir) or None,
        # accelerate compiles the model in prepare(); the launcher's flag was folded into the config.
        "dynamo_plugin": dynamo_plugin(cfg),
    }
    launched_ds = os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() == "true"
    if launched_ds and cfg.run.backend != "deepspeed":
        raise ConfigError("launched with a DeepSpeed accelerate config but run.backend is "
                          f"{cfg.run.backend!r}; set run.backend=deepspeed and run.deepspeed_config")
    if cfg.run.backend == "deepspeed":
        if cfg.run.grad_allreduce != "fp32":
            raise ConfigError("run.grad_allreduce applies to DDP; DeepSpeed sets its communication "
                              "dtype in its JSON (communication_data_type)")
        _neutralise_transformers_hook()
        if not on_gpu:
            keep_deepspeed_collectives_on_gloo()
        # mixed_precision stays "no": DeepSpeed's torch_autocast does bf16 over fp32 master weights.
        # cpu=True must not be set here: with DeepSpeed it silently falls back to DDP.
        kwargs["deepspeed_plugin"] = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg))
        kwargs["mixed_precision"] = "no"
        os.environ.pop("ACCELERATE_USE_CPU", None)
    else:
        kwargs["mixed_precision"] = "bf16" if cfg.run.precision == "bf16" else "no"
        # Without cpu=True, accelerate on a GPU-less machine runs each rank alone.
        kwargs["cpu"] = not on_gpu
    logger.debug("accelerator: backend %s, world %s, gpu %s", cfg.run.backend, world, on_gpu)
    return Accelerator(**kwargs)

"""Distributed identity and the Accelerator, with the CPU traps of accelerate/DeepSpeed handled.

One resolver reads who this process is, in order: torchrun / `accelerate launch` variables
(RANK, WORLD_SIZE, LOCAL_RANK), then Slurm's one-process-per-task variables (SLURM_PROCID,
SLURM_NTASKS, SLURM_LOCALID), then a single local process. `export_torch_env` writes the result
back as the torch.distributed variables that accelerate reads.

Environment knob: MTLXRAY_PG_TIMEOUT_S sets the process-group timeout (default 1800 s); tests
shorten it so that a hung collective fails fast instead of after gloo's 30 minutes.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path

import torch

from mtlxray.config import Config
from mtlxray.errors import ConfigError

__all__ = ["WorldInfo", "resolve_world", "export_torch_env", "build_accelerator", "deepspeed_config",
           "keep_deepspeed_collectives_on_gloo"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class WorldInfo:
    """Who this process is in the job."""

    rank: int
    local_rank: int
    world_size: int
    source: str
    """Where the identity came from: "torchrun", "slurm" or "local"."""


def resolve_world(env: dict[str, str] | None = None) -> WorldInfo:
    """Rank, local rank and world size from torchrun/accelerate, then Slurm tasks, then local."""
    env = dict(os.environ) if env is None else env
    if "RANK" in env and "WORLD_SIZE" in env:
        return WorldInfo(int(env["RANK"]), int(env.get("LOCAL_RANK", 0)), int(env["WORLD_SIZE"]), "torchrun")
    if "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
        return WorldInfo(int(env["SLURM_PROCID"]), int(env.get("SLURM_LOCALID", 0)),
                         int(env["SLURM_NTASKS"]), "slurm")
    return WorldInfo(0, 0, 1, "local")


def _first_slurm_host(nodelist: str) -> str:
    """First host of a Slurm node list (`node[1-3]` → `node1`), via scontrol when it is there."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True,
                             text=True, check=True, timeout=10).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    return nodelist.split(",")[0].split("[")[0]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def export_torch_env(info: WorldInfo, force: bool = False) -> None:
    """Set RANK/WORLD_SIZE/LOCAL_RANK/MASTER_ADDR/MASTER_PORT where the launcher did not.

    A single local process gets them only with `force` (DeepSpeed wants a process group even then).
    """
    if info.world_size == 1 and not force:
        return
    os.environ.setdefault("RANK", str(info.rank))
    os.environ.setdefault("WORLD_SIZE", str(info.world_size))
    os.environ.setdefault("LOCAL_RANK", str(info.local_rank))
    os.environ.setdefault("LOCAL_WORLD_SIZE", os.environ.get("SLURM_NTASKS_PER_NODE", str(info.world_size))
                          .split("(")[0])
    if info.source == "slurm":
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        # A port derived from the job id: every task computes the same one without talking.
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
    elif info.source == "local":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))


def deepspeed_config(cfg: Config) -> dict:
    """The run's DeepSpeed JSON with `auto` values filled from the config.

    bf16 goes through DeepSpeed's `torch_autocast` (fp32 master weights), never its `bf16` mode.
    """
    if not cfg.run.deepspeed_config:
        raise ConfigError("run.backend=deepspeed needs run.deepspeed_config (e.g. configs/deepspeed/zero2.json)")
    path = Path(cfg.run.deepspeed_config)
    if not path.is_file():
        raise ConfigError(f"run.deepspeed_config: file not found: {path}")
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


def pg_timeout() -> datetime.timedelta:
    return datetime.timedelta(seconds=float(os.environ.get("MTLXRAY_PG_TIMEOUT_S", "1800")))


def build_accelerator(cfg: Config, run_dir: Path):
    """An Accelerator for cfg.run.backend/precision on this machine (GPU: nccl; CPU: gloo)."""
    from accelerate import Accelerator
    from accelerate.utils import (DDPCommunicationHookType, DeepSpeedPlugin, DistributedDataParallelKwargs,
                                  InitProcessGroupKwargs, ProjectConfiguration)

    world = resolve_world()
    distributed = world.world_size > 1 or cfg.run.backend == "deepspeed"
    export_torch_env(world, force=distributed)
    on_gpu = torch.cuda.is_available()
    # gloo must be named on CPU (else each DeepSpeed rank thinks it is alone), and only when there is
    # a process group to make: accelerate treats any named backend as distributed.
    pg = InitProcessGroupKwargs(backend="gloo" if distributed and not on_gpu else None, timeout=pg_timeout())
    hook = {"fp32": DDPCommunicationHookType.NO, "fp16": DDPCommunicationHookType.FP16,
            "bf16": DDPCommunicationHookType.BF16}[cfg.run.grad_allreduce]
    kwargs: dict = {
        "kwargs_handlers": [pg, DistributedDataParallelKwargs(comm_hook=hook)],
        "gradient_accumulation_steps": cfg.optim.grad_accum,
        # The loop steps the scheduler once per optimizer step itself; accelerate would otherwise
        # step it once per process.
        "step_scheduler_with_optimizer": False,
        "project_config": ProjectConfiguration(project_dir=str(run_dir), logging_dir=str(run_dir)),
        "log_with": "tensorboard" if cfg.run.tensorboard else None,
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

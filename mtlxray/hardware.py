"""What the local hardware does fast: the facts behind `auto` choices (precision, attention kernel, loader workers)."""

from __future__ import annotations

import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import Literal, Optional, Union

import torch

from mtlxray.dist import WorldInfo, resolve_world
from mtlxray.errors import ConfigError

__all__ = ["cpu_has_native_bf16", "bf16_is_fast", "resolve_precision", "resolve_attention", "cuda_devices",
           "LOADER_CORES_PER_GPU", "cpus_per_process", "auto_workers", "resolve_workers"]

log = logging.getLogger(__name__)


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU has AVX-512, where oneDNN runs bf16 matmuls and convolutions natively.

    On AVX2-only CPUs the bf16 kernels take a slow path: a 512² bf16 matmul measured ~1 GFLOP/s
    against ~17 GFLOP/s in fp32 on one core, so bf16 training there is far slower than fp32."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512")


def bf16_is_fast(device_type: str) -> bool:
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return device_type == "cpu" and cpu_has_native_bf16()


def resolve_precision(requested: str, device_type: str) -> str:
    """`auto` -> bf16 where the device runs it fast, else fp32; `bf16` on a device that does not is
    kept, with a warning."""
    fast = bf16_is_fast(device_type)
    if requested == "auto":
        return "bf16" if fast else "fp32"
    if requested == "bf16" and not fast:
        log.warning("run.precision=bf16 on a %s without native bf16 (%s): expect it to be much slower "
                    "than fp32; run.precision=auto picks fp32 here", device_type,
                    torch.backends.cpu.get_cpu_capability() if device_type == "cpu" else "no bf16 support")
    return requested


_PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_attention(impl: str, dtype: Union[torch.dtype, str],
                      device_type: str) -> Literal["sdpa", "explicit", "flex"]:
    """The window-attention kernel for a model that runs on `device_type` in `dtype`.

    impl: `model.attention` (`auto`, `sdpa` or `explicit`); a kernel named there is kept. `auto`
    gives the measured choice (docs/model.md, "Window attention"; the `attention` benchmark): with an
    additive mask CPU SDPA takes its math path, slower than the explicit softmax by 1.1-1.8× in
    fp32 and about 2× in bf16 on AVX-512 CPUs (native bf16 dot products), so those run `explicit`;
    on AVX2-only CPUs the explicit form's bf16 batched matmuls take a slow path and SDPA was 8×
    faster; GPUs run SDPA, whose fused kernels take the mask.
    dtype: the activation dtype (the autocast dtype under mixed precision), or a `run.precision`
    value (`fp32`, `bf16`). Apply it once, where the model is placed:
    `model.set_attention(resolve_attention(cfg.model.attention, precision, device.type))`.
    """
    if isinstance(dtype, str):
        if dtype not in _PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {'|'.join(_PRECISION_DTYPES)} (resolve `auto` first), "
                             f"got {dtype!r}")
        dtype = _PRECISION_DTYPES[dtype]
    if impl == "flex" and device_type == "cpu":
        raise ConfigError("model.attention=flex: torch's flex_attention has no backward on CPU; "
                         "use auto, sdpa or explicit there")
    if impl in ("sdpa", "explicit", "flex"):
        kernel, why = impl, "as configured"
    elif impl != "auto":
        raise ValueError(f"model.attention must be auto|sdpa|explicit|flex, got {impl!r}")
    elif device_type != "cpu":
        kernel, why = "sdpa", f"auto on {device_type}: fused SDPA kernels"
    elif dtype == torch.bfloat16 and not cpu_has_native_bf16():
        kernel, why = "sdpa", "auto on a CPU without native bf16: the explicit form's bf16 matmuls are slow there"
    else:
        kernel, why = "explicit", f"auto on CPU in {str(dtype).removeprefix('torch.')}: CPU SDPA with a mask " \
                                  "runs its slower math path"
    log.info("window attention: %s (%s)", kernel, why)
    return kernel  # type: ignore[return-value]


def cuda_devices() -> list[dict]:
    """Every visible CUDA device: index, name, memory, compute capability, bf16 support and
    multiprocessor count ([] without CUDA)."""
    if not torch.cuda.is_available():
        return []
    out = []
    for i in range(torch.cuda.device_count()):
        p = torch.cuda.get_device_properties(i)
        out.append({"index": i, "name": p.name, "memory_bytes": p.total_memory,
                    "capability": f"{p.major}.{p.minor}", "bf16": (p.major, p.minor) >= (8, 0),
                    "multiprocessors": p.multi_processor_count})
    return out


LOADER_CORES_PER_GPU: dict[str, tuple[int, int]] = {
    # card (a fragment of its torch.cuda device name, lower case; the longest match wins) -> loader cores
    # one training process needs to feed its GPU: (augmentation in the loader, augment.on_device or no
    # augmentation). benchmarks/README.md, "Loader cores per GPU": ceil(images/s at 30% of the card's
    # dense bf16 peak in phase 1, 82.1 GFLOP per image, over one loader core's rate on raw shards:
    # 896 samples/s augmenting, 7,129 drawing the parameters only). That target is ~7x the speed
    # measured today, so the figures cover any speed-up up to it; PNG shards need about twice as many.
    "b200": (10, 2),
    "h200": (5, 1),
    "h100": (5, 1),  # SXM
    "h100 nvl": (4, 1),
    "h100 pcie": (4, 1),
    "l40s": (2, 1),
    "a100": (2, 1),
    "a10g": (1, 1),
    "a10": (1, 1),
    "l4": (1, 1),
}
CPU_WORKER_MIN_CORES = 4
"""On a CPU, `auto` gives one loader process from this many CPUs per training process, none below.
The model computes on every core the process has, so a loader process takes its core from it: the
demo on 2 cores trained in 134 s decoding in the training process against 218 s with one loader
process (docs/demo.md), while one core decodes and augments several hundred images per second and
the paper model trains on under one per second on such a CPU (benchmarks/README.md)."""


def cpus_per_process(env: Mapping[str, str], world: WorldInfo) -> int:
    """CPUs one training process may use: those it may run on (its affinity mask), shared with the
    other training processes of its node. Where Slurm gives each task SLURM_CPUS_PER_TASK, they are
    the cap, and only the processes started inside one task share them: one Slurm task per process
    (the sbatch scripts, `mtlxray submit`, whose submitit sets torchrun's variables) has its own,
    while torchrun or `accelerate launch` in one task splits the task's CPUs."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    sharing = max(1, world.local_world_size)
    raw = env.get("SLURM_CPUS_PER_TASK", "")
    if raw:
        if not raw.isdigit() or int(raw) < 1:
            raise ConfigError(f"SLURM_CPUS_PER_TASK={raw!r} is not a positive integer")
        cpus = min(cpus, int(raw))
        tasks = re.match(r"\d+", env.get("SLURM_TASKS_PER_NODE", ""))  # `8(x2)`: 8 tasks on each of 2 nodes
        tasks_here = world.local_world_size if world.source == "slurm" else int(tasks[0]) if tasks else 1
        sharing = -(-sharing // max(1, tasks_here))
    return max(1, cpus // sharing)


def auto_workers(*, cpus: int, device_type: str, device_name: str = "",
                 augment_in_loader: bool = True) -> tuple[int, str]:
    """`data.workers: auto` for a training process with `cpus` CPUs on `device_type` (and the GPU
    `device_name`), and why: what the card needs (`LOADER_CORES_PER_GPU`; a card not in it gets the
    most any card there needs), at most `cpus` less one for the training process itself; on a CPU,
    one loader process from `CPU_WORKER_MIN_CORES` CPUs on, else none (decoding in the process)."""
    if device_type == "cpu":
        n = 1 if cpus >= CPU_WORKER_MIN_CORES else 0
        how = "one loader process" if n else f"decoding in the training process below {CPU_WORKER_MIN_CORES} CPUs"
        return n, f"auto on CPU with {cpus} CPUs for this process, which the model computes on: {how}"
    hits = [k for k in LOADER_CORES_PER_GPU if k in device_name.lower()]
    card = max(hits, key=len) if hits else None
    needs = LOADER_CORES_PER_GPU[card] if card else max(LOADER_CORES_PER_GPU.values())
    need = needs[0] if augment_in_loader else needs[1]
    where = "augmenting in the loader" if augment_in_loader else "not augmenting in the loader"
    return max(0, min(cpus - 1, need)), (
        f"auto on {device_name or device_type}: {need} loader cores needed ({card or 'a card not in the table'}, "
        f"{where}), {cpus} CPUs for this process less 1 for training")


def resolve_workers(requested: Union[int, str], *, augment_in_loader: bool, env: Optional[Mapping[str, str]] = None,
                    world: Optional[WorldInfo] = None, device_type: Optional[str] = None) -> tuple[int, str]:
    """`data.workers` for this process, and why: a number is kept; `auto` is `auto_workers` for the
    CPUs this process has (`cpus_per_process`) and the device it trains on (default: the GPU where
    torch sees one)."""
    if requested != "auto":
        return int(requested), "as configured"
    env = os.environ if env is None else env
    world = resolve_world(env) if world is None else world
    if device_type is None:
        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    name = torch.cuda.get_device_name() if device_type == "cuda" and torch.cuda.is_available() else ""
    return auto_workers(cpus=cpus_per_process(env, world), device_type=device_type, device_name=name,
                        augment_in_loader=augment_in_loader)

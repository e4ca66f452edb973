"""What the local hardware does fast: the facts behind `auto` choices (precision, attention kernel, loader workers)."""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
import re
from collections.abc import Mapping
from typing import Literal, Optional, Union

import torch

from mtlxray.dist import WorldInfo, resolve_world
from mtlxray.errors import ConfigError

__all__ = ["cpu_has_native_bf16", "bf16_is_fast", "resolve_precision", "resolve_attention", "attention_choice",
           "AttentionChoice", "ATTENTION_TABLE", "cuda_devices", "LOADER_CORES_PER_GPU", "cpus_per_process",
           "auto_workers", "resolve_workers"]

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


@dataclasses.dataclass(frozen=True)
class AttentionChoice:
    """One row of the table `model.attention: auto` looks up: where it applies, the kernel, and the
    measurement it rests on."""

    device: str
    """Device type (`cpu`, `cuda`), or `*` for any."""
    dtypes: tuple[str, ...]
    """Activation dtypes it covers (`fp32`, `bf16`, `fp16`), or `("*",)`."""
    cpu: Literal["native-bf16", "avx2", "*"]
    """On a CPU: with native bf16 (AVX-512) or AVX2 only; `*` for either."""
    kernel: Literal["sdpa", "explicit", "flex"]
    measured: str
    """What it rests on: the figures, the suite, the date and the machine."""

    def matches(self, device_type: str, dtype: str, cpu: str) -> bool:
        return (self.device in ("*", device_type) and ("*" in self.dtypes or dtype in self.dtypes)
                and self.cpu in ("*", cpu))

    def describe(self, device_type: str, dtype: str) -> str:
        """One line: `cpu, fp32: explicit 1.11× sdpa over the encoder fwd+bwd ..., bench attention 2026-12-07 ...`."""
        where = {"native-bf16": ", native bf16", "avx2": ", AVX2 only (no native bf16)", "*": ""}[self.cpu]
        return f"{device_type}, {dtype}{where}: {self.measured}"


ATTENTION_TABLE: tuple[AttentionChoice, ...] = (
    # With an additive mask CPU SDPA runs its math path: the explicit softmax is faster in fp32 and,
    # where the CPU has native bf16 dot products, in bf16. On AVX2 only, the explicit form's bf16
    # batched matmuls take a slow path, while SDPA accumulates in fp32.
    AttentionChoice("cpu", ("bf16",), "native-bf16", "explicit",
                    "explicit 2.39× sdpa over the encoder fwd+bwd (156 vs 373 ms), bench attention 2026-12-07 "
                    "(AVX-512 bf16, batch 8)"),
    AttentionChoice("cpu", ("bf16",), "avx2", "sdpa",
                    "sdpa 7.0× explicit over the encoder fwd+bwd (620 vs 4360 ms), bench attention 2026-11-23 "
                    "(AVX2, batch 8)"),
    AttentionChoice("cpu", ("*",), "*", "explicit",
                    "explicit 1.11× sdpa over the encoder fwd+bwd in fp32 (566 vs 631 ms), bench attention "
                    "2026-12-07 (AVX-512, batch 8); 1.14× on AVX2 (2026-11-23); other dtypes follow fp32"),
    # GPUs: SDPA's fused kernels take the additive mask (`mtlxray doctor` probes which); flex joins
    # this table once the `gpu` suite shows it ahead.
    AttentionChoice("*", ("*",), "*", "sdpa",
                    "fused SDPA kernels (efficient/cuDNN) take the mask, tests/gpu/test_sdpa_gpu.py; "
                    "no GPU table of sdpa vs flex yet (bench gpu)"),
)
"""`model.attention: auto` -> kernel, first matching row wins (docs/compile.md, "Window attention")."""


def _dtype_name(dtype: Union[torch.dtype, str]) -> str:
    if isinstance(dtype, str):
        if dtype not in _PRECISION_DTYPES:
            raise ValueError(f"precision must be one of {'|'.join(_PRECISION_DTYPES)} (resolve `auto` first), "
                             f"got {dtype!r}")
        return dtype
    return {v: k for k, v in _PRECISION_DTYPES.items()}.get(dtype, str(dtype).removeprefix("torch."))


def attention_choice(dtype: Union[torch.dtype, str], device_type: str) -> AttentionChoice:
    """The row of `ATTENTION_TABLE` that `auto` follows on `device_type` in `dtype`."""
    name = _dtype_name(dtype)
    cpu = ("native-bf16" if cpu_has_native_bf16() else "avx2") if device_type == "cpu" else "*"
    return next(row for row in ATTENTION_TABLE if row.matches(device_type, name, cpu))


def resolve_attention(impl: str, dtype: Union[torch.dtype, str],
                      device_type: str) -> Literal["sdpa", "explicit", "flex"]:
    """The window-attention kernel for a model that runs on `device_type` in `dtype`.

    impl: `model.attention` (`auto`, `sdpa`, `explicit` or `flex`); a kernel named there is kept.
    `auto` gives the measured choice: the row of `ATTENTION_TABLE` for this device, dtype and CPU.
    dtype: the activation dtype (the autocast dtype under mixed precision), or a `run.precision`
    value (`fp32`, `bf16`). Apply it once, where the model is placed:
    `model.set_attention(resolve_attention(cfg.model.attention, precision, device.type))`.
    """
    _dtype_name(dtype)  # refuse an unresolved precision whatever impl says
    if impl == "flex" and device_type == "cpu":
        raise ConfigError("model.attention=flex: torch's flex_attention has no backward on CPU; "
                         "use auto, sdpa or explicit there")
    if impl in ("sdpa", "explicit", "flex"):
        kernel, why = impl, "as configured"
    elif impl != "auto":
        raise ValueError(f"model.attention must be auto|sdpa|explicit|flex, got {impl!r}")
    else:
        row = attention_choice(dtype, device_type)
        kernel, why = row.kernel, f"auto: {row.describe(device_type, _dtype_name(dtype))}"
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

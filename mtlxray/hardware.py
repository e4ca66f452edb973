"""What the local hardware does fast: the facts behind `auto` choices (precision, attention kernel)."""

from __future__ import annotations

import functools
import logging

from typing import Literal, Union

import torch

from mtlxray.errors import ConfigError

__all__ = ["cpu_has_native_bf16", "bf16_is_fast", "resolve_precision", "resolve_attention", "cuda_devices"]

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

"""What the local hardware does fast: the facts behind `auto` choices (precision, attention kernel)."""

from __future__ import annotations

import functools
import logging

import torch

__all__ = ["cpu_has_native_bf16", "bf16_is_fast", "resolve_precision"]

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

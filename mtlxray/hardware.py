"""What the local hardware does fast: the facts behind `auto` choices (precision, attention kernel)."""

from __future__ import annotations

import dataclasses
import functools
import logging

from typing import Literal, Union

import torch

from mtlxray.errors import ConfigError

__all__ = ["cpu_has_native_bf16", "bf16_is_fast", "resolve_precision", "resolve_attention", "attention_choice",
           "AttentionChoice", "ATTENTION_TABLE", "cuda_devices"]

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

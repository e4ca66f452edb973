"""What NVIDIA cards can do, by name: dense bf16 peaks (for MFU), looked up by substring of
`torch.cuda.get_device_name()`. The memory sizes the memory plan projects onto are
`mtlxray.memory_plan.CARDS`."""

from __future__ import annotations

from typing import Optional

__all__ = ["BF16_DENSE_TFLOPS", "bf16_dense_peak"]

BF16_DENSE_TFLOPS: dict[str, float] = {
    # name fragment (lower case, most specific first) -> dense bf16 tensor-core TFLOP/s (no sparsity),
    # from NVIDIA's data sheets
    "h200": 989.0,
    "gh200": 989.0,
    "h100 nvl": 835.0,
    "h100 pcie": 756.0,
    "h100": 989.0,  # SXM
    "b200": 2250.0,
    "a100": 312.0,
    "l40s": 362.0,
    "a10g": 70.0,
    "a10": 125.0,
    "l4": 121.0,
}


def bf16_dense_peak(device_name: str) -> Optional[float]:
    """Dense bf16 FLOP/s of the card named `device_name` (e.g. "NVIDIA H100 80GB HBM3"), or None
    when the card is not in the table. The longest matching fragment wins (`h100 pcie` over `h100`)."""
    name = device_name.lower()
    hits = [k for k in BF16_DENSE_TFLOPS if k in name]
    return BF16_DENSE_TFLOPS[max(hits, key=len)] * 1e12 if hits else None

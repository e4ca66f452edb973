"""Where the time goes: the top operators of one call under torch.profiler."""

from __future__ import annotations

from typing import Any, Callable

from torch.profiler import ProfilerActivity, profile


def top_ops(fn: Callable[[], Any], *, k: int = 8, warmup: int = 1) -> list[dict]:
    """The `k` operators with the most self CPU time in one call of `fn`, with their share."""
    for _ in range(warmup):
        fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        fn()
    events = [e for e in prof.key_averages() if e.self_cpu_time_total > 0]
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    events.sort(key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"op": e.key, "self_ms": round(e.self_cpu_time_total / 1e3, 2),
             "share": round(e.self_cpu_time_total / total, 3), "calls": e.count} for e in events[:k]]

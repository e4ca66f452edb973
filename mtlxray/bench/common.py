"""Shared measurement tools: timing with spread, side-by-side A/B runs, FLOP counting, the matmul
ceiling, machine info, and the result record every suite returns."""

from __future__ import annotations

import dataclasses
import datetime as dt
import gc
import os
import platform
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch.utils.flop_counter import FlopCounterMode

from mtlxray.hardware import cuda_devices

Fn = Callable[[], Any]


class SuiteUnavailable(RuntimeError):
    """An optional dependency of a suite is not installed (MONAI: `pip install 'mtlxray[bench]'`);
    recorded in the suite's JSON with the reason, not fatal."""


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and spread over `repeats` calls after warm-up."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    repeats: int

    @classmethod
    def from_samples(cls, samples: list[float]) -> "Timing":
        s = sorted(samples)
        if len(s) >= 4:
            q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive")
        else:
            q1, q3 = s[0], s[-1]
        return cls(statistics.median(s), q1, q3, s[0], s[-1], len(s))

    @property
    def iqr_pct(self) -> float:
        """Interquartile range as a percentage of the median (the spread reported in tables)."""
        return 100.0 * (self.q3 - self.q1) / self.median if self.median > 0 else 0.0

    def rate(self, items: float) -> float:
        """Items per second at the median time."""
        return items / self.median

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "iqr_pct": round(self.iqr_pct, 1)}


def _time_once(fn: Fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def measure(fn: Fn, *, warmup: int = 1, repeats: int = 5) -> Timing:
    """Time `fn` after `warmup` untimed calls."""
    return measure_side_by_side({"x": fn}, warmup=warmup, repeats=repeats)["x"]


def measure_side_by_side(fns: Mapping[str, Fn], *, warmup: int = 1, repeats: int = 5) -> dict[str, Timing]:
    """Time several variants interleaved (A B C A B C ...) so that noise from a shared machine hits
    them all alike; the order rotates each round so no variant always runs first."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        order = names[r % len(names):] + names[: r % len(names)]
        gc.collect()
        gc.disable()  # as timeit does: a collection inside one variant's call would bill it alone
        try:
            for n in order:
                samples[n].append(_time_once(fns[n]))
        finally:
            gc.enable()
    return {n: Timing.from_samples(samples[n]) for n in names}


def count_flops(fn: Fn) -> int:
    """FLOPs of one call of `fn`, counted by torch's FlopCounterMode (matmul/conv/SDPA, 2 per MAC)."""
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return int(counter.get_total_flops())


def matmul_peak(dtype: torch.dtype, *, n: int = 2048, repeats: int = 5, device: str = "cpu") -> float:
    """Measured matmul throughput (GFLOP/s) of an n×n×n product in `dtype` on `device`: the
    compute ceiling the model's figures are compared with (on a GPU, each call synchronises).
    The fastest call sets it: a ceiling, which a shared machine's slow calls would understate
    (the median once read 114 GFLOP/s on a CPU that does 182, so the encoder showed 111% of it)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)

    def mm() -> None:
        torch.mm(a, b)
        if device != "cpu":
            torch.cuda.synchronize(device)

    t = measure(mm, warmup=2, repeats=repeats)
    return 2 * n**3 / t.min / 1e9


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_info() -> list[dict]:
    """Each visible CUDA device: name, memory, compute capability ([] without CUDA)."""
    return [{"index": g["index"], "name": g["name"], "memory_gib": round(g["memory_bytes"] / 2**30, 1),
             "capability": g["capability"]} for g in cuda_devices()]


def machine_info() -> dict:
    """What ran the benchmark: CPU, threads, GPUs, library versions, date."""
    return {
        "cpu": cpu_model(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "cuda": torch.version.cuda if torch.cuda.is_available() else None,
        "gpus": gpu_info(),
    }


@dataclass
class Target:
    """A target from the spec, checked against a measured value (higher is better unless `max`)."""

    name: str
    value: float | None
    threshold: float
    kind: str = "min"
    unit: str = ""
    note: str = ""

    @property
    def met(self) -> bool | None:
        if self.value is None:
            return None
        return self.value >= self.threshold if self.kind == "min" else self.value <= self.threshold

    def as_dict(self) -> dict:
        return {**dataclasses.asdict(self), "met": self.met}


@dataclass
class SuiteResult:
    """What a suite returns: a table of rows, the targets, and free-form details."""

    suite: str
    rows: list[dict] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)
    details: dict = field(default_factory=dict)
    status: str = "ok"
    label: str = "measurement"

    def as_dict(self, machine: dict, quick: bool) -> dict:
        return {
            "suite": self.suite,
            "status": self.status,
            "label": self.label,
            "quick": quick,
            "machine": machine,
            "rows": self.rows,
            "targets": [t.as_dict() for t in self.targets],
            "details": self.details,
        }


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if v == 0 or 0.01 <= abs(v) < 1e5:
            return f"{v:.3g}" if abs(v) < 100 else f"{v:.0f}"
        return f"{v:.3g}"
    return "" if v is None else str(v)


def format_table(rows: list[dict]) -> str:
    """A Markdown table over the union of the rows' keys, in first-seen order."""
    if not rows:
        return "(no rows)"
    cols: list[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    body = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(cols)]
    line = lambda cells: "| " + " | ".join(s.ljust(w) for s, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(cols), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def format_targets(targets: list[Target]) -> str:
    if not targets:
        return ""
    rows = []
    for t in targets:
        op = ">=" if t.kind == "min" else "<="
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t.met]
        rows.append({"target": t.name, "measured": t.value, "goal": f"{op} {t.threshold:g}{t.unit}",
                     "verdict": verdict, "note": t.note})
    return format_table(rows)


@dataclass(frozen=True)
class Context:
    """How a suite is asked to run."""

    quick: bool
    out: Path
    smoke: bool = False
    """Minimal sizes, only to prove the suite runs (the unit tests); figures are meaningless."""
    device: str = field(default_factory=lambda: "cuda" if torch.cuda.is_available() else "cpu")
    """Where the suites that can use a GPU (`model`) run: the GPU when there is one."""

    def pick(self, full: Any, quick: Any, smoke: Any) -> Any:
        return smoke if self.smoke else quick if self.quick else full

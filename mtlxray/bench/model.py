"""`model`: forward+backward throughput of our encoder and full model against MONAI's Swin-T
encoder, fp32 and bf16 autocast, with FLOPs counted and the fraction of this machine's matmul peak."""

from __future__ import annotations

import logging

import torch
from torch import nn

from mtlxray.bench.common import Context, SuiteResult, Target, count_flops, matmul_peak, measure_side_by_side
from mtlxray.bench.profiling import top_ops
from mtlxray.bench.workloads import DTYPES, TINY, have_model, monai_swin_t, ours, train_step
from mtlxray.hardware import cpu_has_native_bf16

log = logging.getLogger(__name__)


def _variants(ctx: Context) -> dict[str, tuple[nn.Module, object]]:
    """name -> (module whose parameters train, forward callable)."""
    monai = monai_swin_t(tiny=ctx.smoke)
    out: dict[str, tuple[nn.Module, object]] = {"monai_encoder": (monai, monai)}
    if have_model():
        full = ours(TINY if ctx.smoke else [], phase="phase2")
        out["ours_encoder"] = (full.encoder, full.encoder)
        out["ours_full"] = (full, full)
    return out


def run(ctx: Context) -> SuiteResult:
    batch = ctx.pick(8, 8, 2)  # >= 2: batch norm after the 1x1 PPM pool needs two values
    size = ctx.pick(256, 256, 64)
    repeats = ctx.pick(7, 3, 1)
    torch.manual_seed(0)
    # Without native bf16 (AVX2-only CPUs) a bf16 step of the full model takes minutes: bf16 is then
    # measured only at smoke size, and the bf16 targets are reported as not measurable here.
    dtypes = ("fp32", "bf16") if ctx.smoke or cpu_has_native_bf16() else ("fp32",)
    peaks = {d: matmul_peak(DTYPES[d], n=ctx.pick(2048, 2048, 256)) for d in dtypes}
    variants = _variants(ctx)
    for module, _ in variants.values():
        module.train()
    x = torch.randn(batch, 1, size, size)
    flops = {n: count_flops(train_step(m, x[:2], "fp32", f)) // 2 for n, (m, f) in variants.items()}

    result = SuiteResult("model")
    rate: dict[tuple[str, str], float] = {}
    for dtype in dtypes:
        steps = {n: train_step(m, x, dtype, f) for n, (m, f) in variants.items()}
        times = measure_side_by_side(steps, warmup=1, repeats=repeats)
        for n, t in times.items():
            img_s = t.rate(batch)
            gflops = img_s * flops[n] / 1e9
            rate[(n, dtype)] = img_s
            result.rows.append({
                "net": n, "dtype": dtype, "batch": batch, "img/s": img_s, "iqr%": t.iqr_pct,
                "GFLOP/img": flops[n] / 1e9, "GFLOP/s": gflops, "peak_frac": gflops / peaks[dtype],
                "vs_monai_enc": img_s / rate[("monai_encoder", dtype)],
            })

    def ratio(a: str, b: str, dtype: str) -> float | None:
        return rate[(a, dtype)] / rate[(b, dtype)] if (a, dtype) in rate and (b, dtype) in rate else None

    full_bf16 = next((r["peak_frac"] for r in result.rows if r["net"] == "ours_full" and r["dtype"] == "bf16"), None)
    no_bf16 = "" if "bf16" in dtypes else (
        f"not measured: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16")
    result.targets = [
        Target("encoder bf16 ours/MONAI", ratio("ours_encoder", "monai_encoder", "bf16"), 1.3, unit="x", note=no_bf16),
        Target("encoder fp32 ours/MONAI", ratio("ours_encoder", "monai_encoder", "fp32"), 1.0, unit="x"),
        Target("full model bf16 fraction of bf16 matmul peak", full_bf16, 0.45, note=no_bf16),
    ]
    result.details = {"matmul_peak_gflops": peaks, "flops_per_image_fwd_bwd": flops, "img_size": size,
                      "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if no_bf16:
        result.details["bf16_matmul_gflops_512"] = matmul_peak(torch.bfloat16, n=512, repeats=2)
    if not have_model():
        result.status = "partial"
        result.details["missing"] = "mtlxray.model.build_model is not part of this build"
    if not ctx.smoke:
        result.details["profile_top_ops"] = {
            f"{n}_{dtypes[-1]}": top_ops(train_step(m, x, dtypes[-1], f)) for n, (m, f) in variants.items()}
    return result

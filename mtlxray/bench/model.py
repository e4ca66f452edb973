"""`model`: forward+backward throughput of our encoder and full model against the Swin-T encoders
of MONAI and timm (`swin_tiny_patch4_window7_224` at the same size, with our stochastic depth),
with FLOPs counted; on a GPU when there is one (bf16 and fp32, MFU against the card's
dense bf16 peak), else on this CPU (fp32, and bf16 where the CPU has it natively, against the
measured matmul peak). Side by side in the same run:

- the full model with its decoder, pyramid pooling and heads in `channels_last` (the encoder's
  maps are NHWC already; the question is whether the convolutions after it gain from it);
- eager against `torch.compile` (inductor) on the tiny model; a compile failure is recorded
  with its error instead of a figure;
- on a CPU with native bf16, in full runs: our encoder and timm's compiled, beside both eager, in
  bf16 (each compile takes one to two minutes on 2 cores).
"""

from __future__ import annotations

import copy
import logging
import time
import traceback

import torch
from torch import nn

from mtlxray.bench.common import (Context, SuiteResult, Target, count_flops, matmul_peak, measure_side_by_side)
from mtlxray.bench.gpus import bf16_dense_peak
from mtlxray.bench.profiling import top_ops
from mtlxray.bench.workloads import TINY, channels_last_decoder, monai_swin_t, ours, timm_swin_t, train_step
from mtlxray.memory_plan import DTYPES
from mtlxray.hardware import cpu_has_native_bf16

log = logging.getLogger(__name__)

def _variants(ctx: Context) -> dict[str, tuple[nn.Module, object]]:
    """name -> (module whose parameters train, forward callable)."""
    monai = monai_swin_t(tiny=ctx.smoke).to(ctx.device)
    timm = timm_swin_t(64 if ctx.smoke else 256, tiny=ctx.smoke).to(ctx.device)
    full = ours(TINY if ctx.smoke else [], phase="phase2").to(ctx.device)
    cl = channels_last_decoder(full)
    return {"monai_encoder": (monai, monai), "timm_encoder": (timm, timm.forward_features),
            "ours_encoder": (full.encoder, full.encoder), "ours_full": (full, full),
            "ours_full_channels_last": (cl, cl)}


def _dtypes(ctx: Context) -> tuple[str, ...]:
    if ctx.device == "cuda":
        return ("bf16", "fp32") if torch.cuda.is_bf16_supported() else ("fp32",)
    # Without native bf16 (AVX2-only CPUs) a bf16 step of the full model takes minutes: bf16 is then
    # measured only at smoke size, and the bf16 targets are reported as not measurable here.
    return ("fp32", "bf16") if ctx.smoke or cpu_has_native_bf16() else ("fp32",)


def _peaks(ctx: Context, dtypes: tuple[str, ...]) -> dict[str, tuple[float, str]]:
    """dtype -> (FLOP/s the fraction is taken against, what that figure is)."""
    out = {}
    for d in dtypes:
        card = bf16_dense_peak(torch.cuda.get_device_name()) if ctx.device == "cuda" and d == "bf16" else None
        if card is not None:
            out[d] = (card, f"{torch.cuda.get_device_name()} dense bf16 peak (data sheet)")
        else:
            n = ctx.pick(4096 if ctx.device == "cuda" else 2048, 2048, 256)
            out[d] = (matmul_peak(DTYPES[d], n=n, device=ctx.device) * 1e9, f"measured {n}² {d} matmul")
    return out


def compiled_vs_eager(ctx: Context, dtype: str) -> tuple[list[dict], dict]:
    """Eager against torch.compile (inductor) on the tiny model, side by side: rows and details
    (compile time, or the error when inductor cannot compile here). Smoke runs do not compile:
    inductor's first compile takes minutes on 2 cores."""
    backend = "inductor"
    batch = ctx.pick(8, 8, 2)
    if ctx.smoke:
        return [{"net": "ours_tiny_compiled", "dtype": dtype, "device": ctx.device, "batch": batch, "img/s": None,
                 "note": "not compiled at smoke size"}], {"compile_backend": None}
    torch.manual_seed(0)
    eager_model = ours(TINY, phase="phase2").to(ctx.device).train()
    compiled_model = copy.deepcopy(eager_model)
    x = torch.rand(batch, 1, 64, 64, device=ctx.device)
    eager = train_step(eager_model, x, dtype)
    compiled = train_step(compiled_model, x, dtype, forward=torch.compile(compiled_model, backend=backend))
    details: dict = {"compile_backend": backend, "compile_batch": batch}
    t0 = time.perf_counter()
    try:
        compiled()  # the first call compiles forward and backward
    except Exception as e:  # noqa: BLE001 - any compiler failure is the finding to record
        details["compile_error"] = "".join(traceback.format_exception_only(type(e), e)).strip()[-4000:]
        log.warning("torch.compile(%s) failed: %s", backend, details["compile_error"].splitlines()[0])
        return [{"net": "ours_tiny_compiled", "dtype": dtype, "device": ctx.device, "batch": batch,
                 "img/s": None, "note": f"compile failed: {details['compile_error'].splitlines()[-1][:200]}"}], details
    details["compile_s"] = time.perf_counter() - t0
    times = measure_side_by_side({"ours_tiny_eager": eager, "ours_tiny_compiled": compiled}, warmup=1,
                                 repeats=ctx.pick(15, 7, 2))
    rows = [{"net": n, "dtype": dtype, "device": ctx.device, "batch": batch, "img/s": t.rate(batch),
             "iqr%": t.iqr_pct, "step_ms": 1e3 * t.median,
             "vs_eager": times["ours_tiny_eager"].median / t.median} for n, t in times.items()]
    return rows, details


def compiled_encoders(ctx: Context, variants: dict, x: torch.Tensor) -> list[dict]:
    """Our encoder and timm's, eager and compiled (inductor), bf16, side by side; [] where that is
    not measured (smoke and quick runs, and CPUs without native bf16: a GPU has the gpu suite)."""
    if ctx.smoke or ctx.quick or ctx.device != "cpu" or not cpu_has_native_bf16():
        return []
    steps = {}
    for net in ("ours_encoder", "timm_encoder"):
        module, forward = variants[net]
        steps[net] = train_step(module, x, "bf16", forward)
        steps[f"{net}_compiled"] = train_step(module, x, "bf16", torch.compile(forward))
        t0 = time.perf_counter()
        steps[f"{net}_compiled"]()  # the first call compiles forward and backward
        log.info("compiled %s in %.0f s", net, time.perf_counter() - t0)
    times = measure_side_by_side(steps, warmup=1, repeats=7)
    timm = times["timm_encoder"].median
    return [{"net": n, "dtype": "bf16", "device": ctx.device, "batch": len(x), "img/s": t.rate(len(x)),
             "iqr%": t.iqr_pct, "step_ms": 1e3 * t.median, "vs_timm_enc": timm / t.median} for n, t in times.items()]


def run(ctx: Context) -> SuiteResult:
    cuda = ctx.device == "cuda"
    batch = ctx.pick(32, 32, 2) if cuda else ctx.pick(8, 8, 2)  # >= 2: batch norm after the 1x1 PPM pool
    size = ctx.pick(256, 256, 64)
    repeats = ctx.pick(20, 10, 1) if cuda else ctx.pick(7, 3, 1)
    torch.manual_seed(0)
    dtypes = _dtypes(ctx)
    peaks = _peaks(ctx, dtypes)
    variants = _variants(ctx)
    for module, _ in variants.values():
        module.train()
    x = torch.randn(batch, 1, size, size, device=ctx.device)
    flops = {n: count_flops(train_step(m, x[:2], "fp32", f)) // 2 for n, (m, f) in variants.items()}

    result = SuiteResult("model")
    rate: dict[tuple[str, str], float] = {}
    for dtype in dtypes:
        steps = {n: train_step(m, x, dtype, f) for n, (m, f) in variants.items()}
        times = measure_side_by_side(steps, warmup=2 if cuda else 1, repeats=repeats)
        rate.update({(n, dtype): t.rate(batch) for n, t in times.items()})
        for n, t in times.items():
            img_s = t.rate(batch)
            achieved = img_s * flops[n]
            result.rows.append({
                "net": n, "dtype": dtype, "device": ctx.device, "batch": batch, "img/s": img_s, "iqr%": t.iqr_pct,
                "GFLOP/img": flops[n] / 1e9, "TFLOP/s": achieved / 1e12, "peak_frac": achieved / peaks[dtype][0],
                "vs_monai_enc": img_s / rate[("monai_encoder", dtype)],
                "vs_timm_enc": img_s / rate[("timm_encoder", dtype)],
            })

    def ratio(a: str, b: str, dtype: str) -> float | None:
        return rate[(a, dtype)] / rate[(b, dtype)] if (a, dtype) in rate and (b, dtype) in rate else None

    encoder_rows = compiled_encoders(ctx, variants, x)
    result.rows += encoder_rows
    compiled = {r["net"]: r["img/s"] for r in encoder_rows}

    compile_dtype = "bf16" if cuda and "bf16" in dtypes else "fp32"
    compile_rows, compile_details = compiled_vs_eager(ctx, compile_dtype)
    result.rows += compile_rows

    full_bf16 = next((r["peak_frac"] for r in result.rows if r["net"] == "ours_full" and r["dtype"] == "bf16"), None)
    no_bf16 = "" if "bf16" in dtypes else (
        f"not measured: this CPU ({torch.backends.cpu.get_cpu_capability()}) has no native bf16")
    result.targets = [
        Target("encoder bf16 ours/MONAI", ratio("ours_encoder", "monai_encoder", "bf16"), 1.3, unit="x", note=no_bf16),
        Target("encoder bf16 ours/timm Swin-T, eager", ratio("ours_encoder", "timm_encoder", "bf16"), 1.3, unit="x",
               note=no_bf16),
        Target("encoder bf16 ours/timm Swin-T, both compiled",
               compiled["ours_encoder_compiled"] / compiled["timm_encoder_compiled"] if compiled else None, 1.3,
               unit="x", note="" if compiled else "full runs on a CPU with native bf16 only"),
        Target("encoder fp32 ours/MONAI", ratio("ours_encoder", "monai_encoder", "fp32"), 1.0, unit="x"),
        Target("full model bf16 fraction of " + ("the card's dense bf16 peak (MFU)" if cuda else "bf16 matmul peak"),
               full_bf16, 0.45 if not cuda else 0.30, note=no_bf16),
    ]
    result.details = {
        "device": ctx.device, "peaks_flops": {d: p for d, (p, _) in peaks.items()},
        "peak_source": {d: s for d, (_, s) in peaks.items()}, "flops_per_image_fwd_bwd": flops, "img_size": size,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "channels_last_decoder_vs_default": {d: ratio("ours_full_channels_last", "ours_full", d) for d in dtypes},
        "encoder_vs_timm": {d: ratio("ours_encoder", "timm_encoder", d) for d in dtypes},
        "compiled_vs_eager": next((r["vs_eager"] for r in compile_rows if r["net"] == "ours_tiny_compiled"
                                   and r.get("vs_eager")), None),
        **compile_details,
    }
    if cuda:
        result.details["gpu"] = torch.cuda.get_device_name()
    if no_bf16:
        result.details["bf16_matmul_gflops_512"] = matmul_peak(torch.bfloat16, n=512, repeats=2)
    if not ctx.smoke and not cuda:
        result.details["profile_top_ops"] = {
            f"{n}_{dtypes[-1]}": top_ops(train_step(m, x, dtypes[-1], f)) for n, (m, f) in variants.items()
            if n != "ours_full_channels_last"}
    return result

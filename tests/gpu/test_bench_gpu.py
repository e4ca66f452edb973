"""The `model` benchmark on the GPU (img/s, MFU against the card's dense bf16 peak, ours against
MONAI's Swin-T encoder), and the memory projection against what CUDA's allocator really holds."""

from __future__ import annotations

import pytest
import torch

from _gpu_support import requires_gpu

pytestmark = requires_gpu


def test_model_benchmark_on_the_gpu_reports_mfu_beside_monai(tmp_path):
    from mtlxray.bench.common import Context
    from mtlxray.bench.gpus import bf16_dense_peak
    from mtlxray.bench.run import render, run_suite

    data = run_suite("model", Context(quick=True, out=tmp_path, device="cuda"))
    print("\n" + render(data))  # the table to record in benchmarks/README.md (pytest -s)
    assert data["status"] == "ok" and data["details"]["device"] == "cuda"
    rows = {(r["net"], r["dtype"]): r for r in data["rows"]}
    for net in ("monai_encoder", "timm_encoder", "ours_encoder", "ours_full", "ours_full_channels_last"):
        r = rows[(net, "bf16")]
        assert r["device"] == "cuda" and r["img/s"] > 0 and 0 < r["peak_frac"] < 1, r
        assert r["vs_monai_enc"] > 0 and r["vs_timm_enc"] > 0
    if bf16_dense_peak(torch.cuda.get_device_name()) is not None:
        assert "data sheet" in data["details"]["peak_source"]["bf16"]  # MFU against the card's peak
    compiled = rows[("ours_tiny_compiled", "bf16")]
    assert compiled.get("img/s") or data["details"].get("compile_error")


@pytest.mark.parametrize("mode", ["none", "block"])
def test_memory_projection_is_near_the_allocator_peak_of_a_real_step(mode):
    """Phase 1 of the paper model at batch 32: the CPU-counted activation bytes (the projection's
    input) against `max_memory_allocated` over one bf16 step, less what was allocated before it and
    the parameter gradients. Batch 32 keeps cuDNN's workspaces a small part of the peak."""
    from mtlxray.bench.memory import paper_config
    from mtlxray.memory_plan import ALLOCATOR_MARGIN, measure_activations, ours_from_config, place, tensor_sum

    cfg = paper_config("phase1", False, f"model.grad_checkpoint={mode}")
    projected = measure_activations(cfg, precision="bf16")[0].at(32) * (1 + ALLOCATOR_MARGIN)
    torch.manual_seed(0)
    model = place(ours_from_config(cfg), "bf16", "cuda", cfg.model.attention).cuda().train()
    x = torch.rand(32, 1, 256, 256, device="cuda")
    for _ in range(2):  # the second step is measured: cuDNN/cuBLAS set up in the first
        for p in model.parameters():
            p.grad = None
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = tensor_sum(model(x))
        loss.backward()
        torch.cuda.synchronize()
    grads = sum(p.numel() * 4 for p in model.parameters() if p.grad is not None)
    measured = torch.cuda.max_memory_allocated() - before - grads
    print(f"\n{mode}: projected activations {projected / 2**30:.2f} GiB, measured {measured / 2**30:.2f} GiB "
          f"(ratio {measured / projected:.2f})")
    assert 0.5 < measured / projected < 2.0

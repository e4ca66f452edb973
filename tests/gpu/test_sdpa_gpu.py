"""SDPA with the shifted-window mask runs a fused kernel on CUDA, not the math fallback.

Checked by restricting `torch.nn.attention.sdpa_kernel` to the fused kernels: the call must
succeed (with the math kernel excluded, SDPA raises instead of falling back)."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from _gpu_support import CONFIGS, requires_gpu

pytestmark = requires_gpu

FUSED = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION]


def _shifted_stage1_attention():
    """The paper model's first shifted window attention at 256² (64×64 map padded to 70, shift 3:
    relative-position bias plus shift and padding mask) and its input shape."""
    from mtlxray.memory_plan import ours_from_config
    from mtlxray.config import load_config
    from mtlxray.doctor import window_attention_shapes

    cfg = load_config(CONFIGS / "phase1.yaml")
    model = ours_from_config(cfg)
    module, shape = next((m, s) for m, s in window_attention_shapes(model, cfg.model.img_size)
                         if m.shift_size > 0 and s[1] == cfg.model.img_size // 4)
    attn = copy.deepcopy(module).cuda().train()
    attn.set_attention("sdpa")
    return attn, shape


def _sdpa_query_dims(attn, x) -> set[int]:
    """The number of dimensions of the query the module hands to SDPA."""
    seen, sdpa = set(), F.scaled_dot_product_attention

    def spy(q, *args, **kwargs):
        seen.add(q.dim())
        return sdpa(q, *args, **kwargs)

    F.scaled_dot_product_attention = spy
    try:
        with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
            attn(x)
    finally:
        F.scaled_dot_product_attention = sdpa
    return seen


def test_window_attention_with_shift_mask_runs_a_fused_kernel_in_bf16():
    attn, shape = _shifted_stage1_attention()
    x = torch.randn(8, *shape[1:], device="cuda", requires_grad=True)
    # CUDA's fused kernels take only 4-D (batch, heads, tokens, dim) tensors: the model folds its
    # windows into the head axis.
    assert _sdpa_query_dims(attn, x) == {4}
    with sdpa_kernel(FUSED), torch.autocast("cuda", dtype=torch.bfloat16):
        out = attn(x)  # raises "No available kernel" if only the math kernel would take these inputs
    out.float().sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(x.grad).all()
    with sdpa_kernel([SDPBackend.MATH]), torch.autocast("cuda", dtype=torch.bfloat16):
        ref = attn(x)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


def test_folded_window_layout_takes_the_memory_efficient_kernel():
    """Windows folded into the head axis, (B, windows·heads, N, d), with the bias + mask broadcast
    over the batch (stride 0): the layout that the 4-dimensional fused kernels accept."""
    B, nW, h, N, d = 8, 100, 3, 49, 32
    g = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(B, nW * h, N, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_()
               for _ in range(3))
    blocked = torch.rand(nW, 1, N, N, device="cuda", generator=g) > 0.7
    blocked &= ~torch.eye(N, dtype=torch.bool, device="cuda")  # every query sees itself
    bias = torch.randn(1, h, N, N, device="cuda", generator=g) * 0.1
    mask = (bias + torch.zeros(nW, 1, N, N, device="cuda").masked_fill(blocked, float("-inf")))
    mask = mask.reshape(1, nW * h, N, N).to(torch.bfloat16)  # broadcast over the batch
    with sdpa_kernel([SDPBackend.EFFICIENT_ATTENTION]):
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    out.float().sum().backward()
    with sdpa_kernel([SDPBackend.MATH]):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask.float())
    torch.testing.assert_close(out.float(), ref, rtol=3e-2, atol=3e-2)
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))


def test_flex_attention_matches_explicit_forward_and_backward_on_the_stage1_shape():
    attn, shape = _shifted_stage1_attention()
    with torch.no_grad():
        attn.relative_position_bias_table.normal_()
    x = torch.randn(*shape, device="cuda")
    results = {}
    for kernel in ("explicit", "flex"):
        attn.set_attention(kernel)
        attn.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        out = attn(xi)
        out.square().sum().backward()
        results[kernel] = (out, xi.grad, attn.relative_position_bias_table.grad)
    torch.testing.assert_close(results["flex"], results["explicit"], atol=1e-4, rtol=1e-4)

"""`attention`: window attention as `F.scaled_dot_product_attention` versus the explicit
`softmax(q k^T * scale + bias + mask) v` versus `flex_attention` (bias and mask in its score_mod),
fp32 and bf16 autocast, forward and forward+backward, at the window shapes of the Swin-T encoder on
a 256² input (the evidence behind `model.attention`). On a CPU flex has no backward (torch raises)
and runs eagerly as its reference implementation: its forward is measured, its fwd+bwd is not.
Beside them, a table of one `SwinBlock`'s forward+backward at each stage's map and width with the
window attention's current gather/scatter layout versus the former one (`FormerWindowAttention`),
time and aten::copy_ calls side by side."""

from __future__ import annotations

import copy
import math

import torch
import torch.nn.functional as F

from mtlxray.bench.common import Context, SuiteResult, measure_side_by_side
from mtlxray.model.swin import SwinBlock, WindowAttention

WINDOW = 7
HEAD_DIM = 32


def stage_shapes(img_size: int = 256, patch: int = 4, depths=(2, 2, 6, 2), heads=(3, 6, 12, 24)) -> list[dict]:
    """Per stage: feature side, windows per image after padding to a multiple of 7, heads, depth."""
    out = []
    for i, (depth, h) in enumerate(zip(depths, heads)):
        side = img_size // patch // 2**i
        padded = math.ceil(side / WINDOW) * WINDOW
        out.append({"stage": i + 1, "side": side, "windows": (padded // WINDOW) ** 2, "heads": h, "depth": depth})
    return out


def explicit_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """softmax(q k^T / sqrt(d) + mask) v; q,k,v: (B, nW, H, N, d), mask: (nW, H, N, N)."""
    attn = (q * q.shape[-1] ** -0.5) @ k.transpose(-2, -1)  # (B, nW, H, N, N)
    return (attn + mask).softmax(dim=-1) @ v  # (B, nW, H, N, d)


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def flex_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The same maths through torch's flex_attention, windows folded into its head axis and the
    per-window, per-head bias+mask added by `score_mod` (as `WindowAttention` does)."""
    from torch.nn.attention.flex_attention import flex_attention as flex

    B, nW, H, N, d = q.shape
    bias = mask.reshape(nW * H, N, N)

    def score_mod(score, b, head, q_idx, kv_idx):
        return score + bias[head, q_idx, kv_idx].to(score.dtype)

    fold = [t.reshape(B, nW * H, N, d) for t in (q, k, v)]
    return flex(*fold, score_mod=score_mod).view(B, nW, H, N, d)


class FormerWindowAttention(WindowAttention):
    """`WindowAttention` with its former gather/scatter layout (sdpa and explicit kernels), kept as
    the baseline its block is measured against and tested equal to: windows gathered as
    (B, nW·N, 3C), q, k, v permuted to (B, nW, heads, N, d) views that the kernels copy, and the
    output transposed back to (B, nW·N, C) before a second copy scatters it to the map."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        if (H, W) != self.input_size:
            self.set_input_size(H, W)
        N, h = self.window_size ** 2, self.num_heads
        qkv = self.qkv(x).reshape(B, H * W, 3 * C)
        gather, scatter, mask = self.window_gather, self.window_scatter, self.attn_mask
        nW = gather.numel() // N
        win = qkv.index_select(1, gather).view(B, nW, N, 3, h, C // h)  # padded, rolled windows
        q, k, v = win.permute(3, 0, 1, 4, 2, 5).unbind(0)  # each B, nW, heads, N, d
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # N*N, heads
        bias = bias.view(N, N, h).permute(2, 0, 1).to(q.dtype)  # heads, N, N
        if mask is not None:
            bias = bias + mask.to(q.dtype)  # nW, heads, N, N
        if self.kernel == "sdpa":
            bias = bias.expand(nW, h, N, N).reshape(1, nW * h, N, N)
            fold = [t.reshape(B, nW * h, N, C // h) for t in (q, k, v)]
            out = F.scaled_dot_product_attention(*fold, attn_mask=bias).view(B, nW, h, N, C // h)
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1) + bias  # B, nW, heads, N, N
            out = attn.softmax(dim=-1, dtype=torch.float32).to(v.dtype) @ v
        out = out.transpose(2, 3).reshape(B, nW * N, C).index_select(1, scatter)  # B, H*W, C
        return self.proj(out.view(B, H, W, C))


def with_former_layout(block: SwinBlock) -> SwinBlock:
    """A copy of `block` (same weights and buffers) whose window attention runs the former layout."""
    former = copy.deepcopy(block)
    former.attn.__class__ = FormerWindowAttention  # same state, only forward differs
    return former


def _inputs(batch: int, windows: int, heads: int, dtype: torch.dtype):
    n = WINDOW * WINDOW
    qkv = [torch.randn(batch, windows, heads, n, HEAD_DIM, dtype=dtype, requires_grad=True) for _ in range(3)]
    # relative-position bias plus a shift mask with -100 where tokens come from different regions
    mask = torch.randn(windows, heads, n, n) * 0.1
    mask[:, :, : n // 2, n // 2:] = -100.0
    return qkv, mask.to(dtype)


def _step(kernel, qkv, mask, dtype: torch.dtype, backward: bool):
    def call() -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            out = kernel(*qkv, mask)
        if backward:
            out.float().sum().backward()
            for t in qkv:
                t.grad = None
    return call


def _copies_per_step(step) -> int:
    """aten::copy_ calls in one call of `step` (torch.profiler): the copies a layout makes, a count
    that a shared machine's noise does not blur."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    return sum(e.count for e in prof.key_averages() if e.key == "aten::copy_")


def block_layout_rows(batch: int, repeats: int, shapes: list[dict]) -> list[dict]:
    """One `SwinBlock` (shifted where the stage shifts) forward+backward at each stage's map and
    width, the window attention in its current layout versus the former one (same weights, same
    process, interleaved), fp32 and bf16 autocast, both CPU kernels."""
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        dname = "bf16" if dtype == torch.bfloat16 else "fp32"
        for s in shapes:
            side, dim = s["side"], HEAD_DIM * s["heads"]
            ws = min(WINDOW, side)
            shift = WINDOW // 2 if side > WINDOW else 0
            x = torch.randn(batch, side, side, dim, requires_grad=True)
            for kernel in ("explicit", "sdpa"):
                torch.manual_seed(0)
                block = SwinBlock(dim, s["heads"], ws, shift, attention=kernel, input_size=(side, side))
                blocks = {"current": block, "former": with_former_layout(block)}

                def step(b: SwinBlock):
                    def call() -> None:
                        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
                            out = b(x)
                        out.float().sum().backward()
                        b.zero_grad(set_to_none=True)
                        x.grad = None
                    return call

                steps = {name: step(b) for name, b in blocks.items()}
                t = measure_side_by_side(steps, warmup=1, repeats=repeats)
                rows.append({
                    "dtype": dname, "kernel": kernel, "stage": s["stage"],
                    "block": f"{batch}x{side}x{side}x{dim} shift {shift}",
                    "current_ms": 1e3 * t["current"].median, "current_iqr%": t["current"].iqr_pct,
                    "former_ms": 1e3 * t["former"].median, "former_iqr%": t["former"].iqr_pct,
                    "current/former": t["current"].median / t["former"].median,
                    "copies current": _copies_per_step(steps["current"]),
                    "copies former": _copies_per_step(steps["former"]),
                })
    return rows


def run(ctx: Context) -> SuiteResult:
    batch = ctx.pick(8, 8, 1)
    repeats = ctx.pick(10, 5, 2)
    shapes = stage_shapes() if not ctx.smoke else stage_shapes()[-1:]
    result = SuiteResult("attention")
    totals: dict[tuple[str, str, str], float] = {}
    for dtype in (torch.float32, torch.bfloat16):
        dname = "bf16" if dtype == torch.bfloat16 else "fp32"
        for s in shapes:
            qkv, mask = _inputs(batch, s["windows"], s["heads"], dtype)
            for mode in ("fwd", "fwd+bwd"):
                bwd = mode == "fwd+bwd"
                steps = {"sdpa": _step(sdpa_attention, qkv, mask, dtype, bwd),
                         "explicit": _step(explicit_attention, qkv, mask, dtype, bwd)}
                # flex has no backward on CPU and refuses inputs that require grad; its eager first
                # call takes seconds, so smoke runs leave it out
                if not bwd and not ctx.smoke:
                    steps["flex"] = _step(flex_attention, [t.detach() for t in qkv], mask, dtype, False)
                t = measure_side_by_side(steps, warmup=1, repeats=repeats)
                for kname in ("sdpa", "explicit"):
                    key = (dname, mode, kname)
                    totals[key] = totals.get(key, 0.0) + s["depth"] * t[kname].median
                result.rows.append({
                    "dtype": dname, "pass": mode, "stage": s["stage"],
                    "shape": f"{batch}x{s['windows']}x{s['heads']}x49x{HEAD_DIM}",
                    "sdpa_ms": 1e3 * t["sdpa"].median, "sdpa_iqr%": t["sdpa"].iqr_pct,
                    "explicit_ms": 1e3 * t["explicit"].median, "explicit_iqr%": t["explicit"].iqr_pct,
                    "flex_ms": 1e3 * t["flex"].median if "flex" in t else None,
                    "sdpa/explicit": t["sdpa"].median / t["explicit"].median,
                })
    choice = {}
    for dname in ("fp32", "bf16"):
        sdpa, expl = totals[(dname, "fwd+bwd", "sdpa")], totals[(dname, "fwd+bwd", "explicit")]
        choice[dname] = "sdpa" if sdpa <= expl else "explicit"
        result.rows.append({
            "dtype": dname, "pass": "fwd+bwd", "stage": "all (x depth)", "shape": "encoder",
            "sdpa_ms": 1e3 * sdpa, "explicit_ms": 1e3 * expl, "sdpa/explicit": sdpa / expl,
        })
    layout_batch = ctx.pick(8, 4, 1)
    layout = block_layout_rows(layout_batch, ctx.pick(7, 3, 1), shapes)
    result.details = {"faster_fwd_bwd": choice, "batch": batch, "stages": shapes,
                      "tables": {f"SwinBlock fwd+bwd, window layout current vs former (batch {layout_batch})": layout},
                      "note": "time per encoder pass = sum over stages of depth x per-layer time; flex_ms: "
                              "forward only, eager (flex has no CPU backward; compiled flex is measured "
                              "in the gpu suite)"}
    return result

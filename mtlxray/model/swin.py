"""Swin Transformer encoder (Swin-T by default) for single-channel images, NHWC inside the stages.

Shifted-window attention pads each map to a multiple of the window and crops after, so sizes such
as 256 (maps 64/32/16/8 with window 7) work; padding tokens are masked as keys. Where a stage's map
is not larger than the window at the configured image size, the window shrinks to the map and the
shift is dropped. The relative position bias is gathered from its table on every call (it is
learned); the window layout and the shift/padding mask are non-persistent buffers built once for the
configured image size (rebuilt, outside any compiled graph, when an eager caller passes another).
The attention kernel (SDPA or an explicit softmax) is an attribute set at construction or by
`set_attention`, never decided per forward: the choice per device and precision is made outside
the model (`mtlxray.hardware.resolve_attention`) by the code that places it.
"""

from __future__ import annotations

import logging
from typing import Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from mtlxray.model.recompute import CHECKPOINT_MODES, CheckpointMode, run_checkpointed, run_segment

__all__ = [
    "SwinEncoder", "SwinBlock", "WindowAttention", "PatchEmbed", "PatchMerging", "DropPath",
    "window_partition", "window_layout", "with_own_backward", "AttnImpl", "AttnKernel", "ATTENTION_KERNELS", "DEFAULT_KERNEL",
]

log = logging.getLogger(__name__)

AttnImpl = Literal["auto", "sdpa", "explicit", "flex"]
"""`model.attention`: a kernel, or `auto` for the measured choice per device and precision."""
AttnKernel = Literal["sdpa", "explicit", "flex"]
"""The kernel a `WindowAttention` runs."""
ATTENTION_KERNELS: tuple[str, ...] = ("sdpa", "explicit", "flex")
DEFAULT_KERNEL: AttnKernel = "sdpa"
"""What `auto` runs until the code that places the model on a device and precision applies the
measured choice (`model.set_attention(mtlxray.hardware.resolve_attention(...))`): SDPA is
PyTorch's portable kernel, never far from the faster one on CPU and fused on GPUs. The model
itself never looks at the hardware (a check per forward would also be a branch that tracers and
exporters have to follow)."""


def check_kernel(kernel: str) -> AttnKernel:
    if kernel not in ATTENTION_KERNELS:
        raise ValueError(f"window attention kernel must be one of {'|'.join(ATTENTION_KERNELS)}, got {kernel!r} "
                         "(resolve `auto` first: mtlxray.hardware.resolve_attention)")
    return kernel  # type: ignore[return-value]


def window_partition(x: torch.Tensor, ws: int) -> torch.Tensor:
    """(B, H, W, C) -> (B, nW, ws*ws, C); H and W must be multiples of ws."""
    B, H, W, C = x.shape
    x = x.view(B, H // ws, ws, W // ws, ws, C)  # B, nH, ws, nW_w, ws, C
    return x.permute(0, 1, 3, 2, 4, 5).reshape(B, (H // ws) * (W // ws), ws * ws, C)


def window_layout(H: int, W: int, ws: int, shift: int,
                  device: torch.device) -> tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Token order of the shifted windows of an H×W map padded to a multiple of `ws`.

    Returns `gather` (nW*N,): the flat map index each window slot reads (padding slots read token
    0 and are masked as keys); `scatter` (H*W,): the slot holding each map token; and `blocked`
    (nW, N, N) bool, True where a query may not see a key (another shift region, or a padding key;
    every slot still sees itself), or None when nothing is blocked.
    """
    Hp, Wp, N = -(-H // ws) * ws, -(-W // ws) * ws, ws * ws
    rows, cols = torch.arange(Hp, device=device), torch.arange(Wp, device=device)
    src_r, src_c = (rows + shift) % Hp, (cols + shift) % Wp  # rolled slot (r, c) holds this map cell
    valid = (src_r < H)[:, None] & (src_c < W)[None, :]  # Hp, Wp
    src = torch.where(valid, src_r[:, None] * W + src_c[None, :], 0)  # Hp, Wp

    def band(v: torch.Tensor, n: int) -> torch.Tensor:  # shift regions: [0, n-ws), [n-ws, n-shift), [n-shift, n)
        return (v >= n - ws).long() + (v >= n - shift).long() if shift else torch.zeros_like(v)

    region = band(rows, Hp)[:, None] * 3 + band(cols, Wp)[None, :]  # Hp, Wp

    def windows(t: torch.Tensor) -> torch.Tensor:
        return window_partition(t.view(1, Hp, Wp, 1), ws).view(-1, N)  # nW, N

    gather, valid_w, region_w = windows(src).flatten(), windows(valid), windows(region)
    blocked = (region_w[:, :, None] != region_w[:, None, :]) | ~valid_w[:, None, :]  # nW, N, N
    # Out of place: exporters have no in-place `&=` (aten::__iand_), and this runs inside a trace
    # whenever the layout for a size is not cached yet.
    blocked = blocked & ~torch.eye(N, dtype=torch.bool, device=device)
    scatter = torch.empty(H * W, dtype=torch.long, device=device)
    slots = torch.arange(gather.numel(), device=device)
    keep = valid_w.flatten()
    scatter[gather[keep]] = slots[keep]
    return gather, scatter, blocked if bool(blocked.any()) else None


def _relative_position_index(ws: int) -> torch.Tensor:
    """(N, N) index into the ((2ws-1)^2, heads) bias table, N = ws*ws."""
    coords = torch.stack(torch.meshgrid(torch.arange(ws), torch.arange(ws), indexing="ij")).flatten(1)  # 2, N
    rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (ws - 1)  # N, N, 2
    return rel[..., 0] * (2 * ws - 1) + rel[..., 1]


def gather_windows(qkv: torch.Tensor, gather: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, H·W, 3, heads, d) -> q, k, v, each (B, heads, nW·N, d) and contiguous: the padded,
    rolled windows, heads outside them."""
    return qkv.permute(2, 0, 3, 1, 4).index_select(3, gather).unbind(0)


def read_slots(slots: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
    """(B, heads, nW·N, d) window slots -> (B, H·W, heads, d) map tokens."""
    return slots.transpose(1, 2).index_select(1, scatter)


def with_own_backward() -> bool:
    """Whether the model's own autograd Functions (the window gathers `_GatherWindows` and
    `_ReadSlots` here, the class head's in `mtlxray.model.heads`) replace their plain ops: only
    where a backward will run, and never under torch.jit.trace (and the TorchScript ONNX
    exporter), which cannot record a Python autograd.Function."""
    return torch.is_grad_enabled() and not torch.jit.is_tracing()


class _GatherWindows(torch.autograd.Function):
    """q, k, v = gather_windows(qkv, gather), with a backward of two passes instead of four.

    qkv: the qkv Linear's output viewed as (B, H·W, 3, heads, d); each output is
    (B, heads, nW·N, d), contiguous. Torch's own backward of that pair stacks the three
    gradients, zero-fills a source-shaped tensor, accumulates into it with `index_add_` (a slow
    path along an inner dimension on CPU) and copies the result into the Linear's layout: four
    passes over every window slot. Here each map token reads its gradient from the one slot that
    holds it (`scatter`), and one stack lays the three out as the Linear's output (an `out=` into
    that strided layout would save the stack, but dynamo cannot trace it). The padding slots also
    read token 0, but their gradient is exactly zero: they are masked as keys, and as queries
    their outputs are never read back (`_ReadSlots`), so nothing is dropped."""

    @staticmethod
    def forward(ctx, qkv: torch.Tensor, gather: torch.Tensor, scatter: torch.Tensor):
        ctx.save_for_backward(scatter)
        return gather_windows(qkv, gather)

    @staticmethod
    def backward(ctx, *grads: torch.Tensor):  # autograd gives zeros for an output without a gradient
        (scatter,) = ctx.saved_tensors
        tokens = [g.index_select(2, scatter).transpose(1, 2) for g in grads]  # each B, H·W, heads, d
        return torch.stack(tokens, dim=2), None, None  # B, H·W, 3, heads, d: the Linear's layout


class _ReadSlots(torch.autograd.Function):
    """(B, heads, nW·N, d) window slots -> (B, H·W, heads, d) map tokens, `scatter[t]` being the slot
    of token t. Backward writes each token's gradient into its slot of a (B, heads, nW·N, d) tensor
    that is contiguous for the attention's matmuls, padding slots zero; torch's backward of
    index_select would accumulate with `index_add_` into a tensor the matmuls then copy again."""

    @staticmethod
    def forward(ctx, slots: torch.Tensor, scatter: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(scatter)
        ctx.slots_shape = slots.shape
        return read_slots(slots, scatter)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (scatter,) = ctx.saved_tensors
        out = grad.new_zeros(ctx.slots_shape)
        out.transpose(1, 2).index_copy_(1, scatter, grad)
        return out, None


class DropPath(nn.Module):
    """Stochastic depth: drop the whole residual branch per sample while training."""

    def __init__(self, p: float = 0.0) -> None:
        super().__init__()
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.p == 0.0 or not self.training:
            return x
        keep = 1.0 - self.p
        mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
        return x * mask.div_(keep)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class WindowAttention(nn.Module):
    """Multi-head (shifted-)window self-attention on an NHWC map, with a learned relative position bias.

    qkv and the output projection run on the map's own tokens; one gather forms the padded,
    rolled windows and one gather reads the result back, so padding costs no Linear FLOPs and
    padding keys are masked out. `attention` is the kernel, fixed until `set_attention` (timm's
    `fused_attn`): `sdpa` (F.scaled_dot_product_attention with bias+mask as attn_mask),
    `explicit` (softmax(q·kᵀ·scale + bias + mask)·v) or `flex` (torch's flex_attention with the
    bias and mask as its score_mod; fast only under torch.compile); all compute the same maths.
    """

    kernel: AttnKernel
    """`sdpa`, `explicit` or `flex` (see `set_attention`)."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int = 0,
                 attention: AttnKernel = DEFAULT_KERNEL, input_size: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.set_attention(attention)
        self.scale = (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * window_size - 1) ** 2, num_heads))
        nn.init.trunc_normal_(self.relative_position_bias_table, std=0.02)
        self.register_buffer("relative_position_index", _relative_position_index(window_size), persistent=False)
        self.input_size: Optional[tuple[int, int]] = None
        """The (H, W) the window layout buffers below are built for."""
        self.register_buffer("window_gather", None, persistent=False)
        self.register_buffer("window_scatter", None, persistent=False)
        self.register_buffer("attn_mask", None, persistent=False)
        if input_size is not None:
            self.set_input_size(*input_size)

    def set_attention(self, kernel: AttnKernel) -> None:
        """Run `kernel` (`sdpa`, `explicit` or `flex`) from the next forward on."""
        self.kernel = check_kernel(kernel)

    @property
    def attention(self) -> AttnKernel:
        return self.kernel

    def set_input_size(self, H: int, W: int) -> None:
        """Build the window layout for an H×W map as buffers (timm's `set_input_size`): the gather
        and scatter indices, and the additive shift/padding mask (nW, 1, N, N; 0 or -inf), or None
        where nothing is blocked. Built here, outside forward, so that a traced or compiled forward
        holds no data-dependent Python; the buffers follow the module's device, and the mask is cast
        to the activation dtype where it is used."""
        device = self.relative_position_index.device
        gather, scatter, blocked = window_layout(H, W, self.window_size, self.shift_size, device)
        self.window_gather, self.window_scatter = gather, scatter
        self.attn_mask = None if blocked is None else torch.zeros(
            blocked.shape, device=device).masked_fill_(blocked, float("-inf")).unsqueeze(1)
        self.input_size = (H, W)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        B, H, W, C = x.shape
        if (H, W) != self.input_size:  # a size other than the one built for: rebuild (eager use)
            self.set_input_size(H, W)
        N, h, d = self.window_size ** 2, self.num_heads, C // self.num_heads
        gather, scatter, mask = self.window_gather, self.window_scatter, self.attn_mask
        nW = gather.numel() // N
        # Heads outside the windows: one gather reads the padded, rolled windows of q, k and v
        # straight into (3, B, heads, nW·N, d), so each is contiguous and the kernels (and SDPA's
        # fold of the windows into its head axis) need no further copy.
        qkv = self.qkv(x).view(B, H * W, 3, h, d)
        own = with_own_backward()
        qkv = _GatherWindows.apply(qkv, gather, scatter) if own else gather_windows(qkv, gather)
        q, k, v = (t.view(B, h, nW, N, d) for t in qkv)
        if self.kernel == "flex":
            out = self._flex(q, k, v)
        else:
            bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]  # N*N, heads
            # Contiguous, as timm makes it: a permuted bias would make each add over the
            # (B, heads, nW, N, N) map a strided walk, 10× slower on CPU.
            bias = bias.to(q.dtype).view(N, N, h).permute(2, 0, 1).contiguous().unsqueeze(1)  # heads, 1, N, N
            if mask is not None:
                bias = bias + mask.squeeze(1).to(q.dtype)  # heads, nW, N, N
            if self.kernel == "sdpa":
                # SDPA's fused CUDA kernels take 4-D inputs only: fold the windows into the head axis,
                # (B, heads·nW, N, d) (views), where the per-window mask broadcasts over the batch.
                bias = bias.expand(h, nW, N, N).reshape(1, h * nW, N, N)
                fold = [t.reshape(B, h * nW, N, d) for t in (q, k, v)]
                out = F.scaled_dot_product_attention(*fold, attn_mask=bias).view(B, h, nW, N, d)
            else:
                # The bias is added in place (the product is not saved for backward), and the softmax
                # runs in the activations' dtype: under CUDA autocast that is fp32 anyway (softmax is on
                # its fp32 list); the CPU's bf16 softmax accumulates in fp32 and rounds once, the same
                # values as fp32 then a cast but without an fp32 copy of the map (its backward then
                # reads the rounded probabilities, as timm's bf16 Swin does).
                attn = ((q * self.scale) @ k.transpose(-2, -1)).add_(bias)  # B, heads, nW, N, N
                out = attn.softmax(dim=-1) @ v
        # One gather reads each map token's slot back, heads and channels merged: (B, H*W, heads, d).
        out = out.view(B, h, nW * N, d)
        out = _ReadSlots.apply(out, scatter) if own else read_slots(out, scatter)
        return self.proj(out.view(B, H, W, C))

    def _flex(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """flex_attention with the relative position bias read from its table in `score_mod`.
        q, k, v: (B, heads, nW, N, d) -> (B, heads, nW, N, d).

        The windows are folded into flex's head axis. The shift/padding mask is added in
        `score_mod` too rather than given as a block mask: a block mask skips whole 128×128 tiles,
        and a window of N ≤ 49 tokens is one partial tile, so it would skip nothing."""
        from torch.nn.attention.flex_attention import flex_attention

        B, h, nW, N, d = q.shape
        table, index, mask = self.relative_position_bias_table, self.relative_position_index, self.attn_mask

        def score_mod(score, b, head, q_idx, kv_idx):  # head = head of the window * nW + window
            score = score + table[index[q_idx, kv_idx], head // nW].to(score.dtype)
            if mask is not None:
                score = score + mask[head % nW, 0, q_idx, kv_idx].to(score.dtype)
            return score

        fold = [t.reshape(B, h * nW, N, d) for t in (q, k, v)]
        return flex_attention(*fold, score_mod=score_mod, scale=self.scale).view(B, h, nW, N, d)

    def extra_repr(self) -> str:
        return f"window_size={self.window_size}, shift_size={self.shift_size}, attention={self.attention}"


class Mlp(nn.Sequential):
    """Linear -> GELU -> Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))


class SwinBlock(nn.Module):
    """Pre-norm (shifted-)window attention + MLP, both residual with stochastic depth. NHWC in and out."""

    def __init__(self, dim: int, num_heads: int, window_size: int, shift_size: int = 0,
                 mlp_ratio: float = 4.0, drop_path: float = 0.0, attention: AttnKernel = DEFAULT_KERNEL,
                 input_size: Optional[tuple[int, int]] = None) -> None:
        super().__init__()
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, num_heads, window_size, shift_size, attention, input_size)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path)
        self.grad_checkpoint: CheckpointMode = "none"

    def _window_attn(self, x: torch.Tensor) -> torch.Tensor:
        return self.attn(self.norm1(x))

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.grad_checkpoint == "attention":
            a = run_checkpointed(self, self._window_attn, x)
        else:
            a = self._window_attn(x)
        x = x + self.drop_path(a)
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, H, W, C) -> (B, H, W, C)."""
        return run_segment(self, self._forward, x)


class PatchEmbed(nn.Module):
    """Non-overlapping patch convolution + LayerNorm: (B, Cin, H, W) -> (B, H/p, W/p, D)."""

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).permute(0, 2, 3, 1))  # B, H/p, W/p, D


class PatchMerging(nn.Module):
    """2×2 neighbour concat + LayerNorm + Linear 4C -> 2C: (B, H, W, C) -> (B, H/2, W/2, 2C)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(4 * dim)
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, H, W, C = x.shape
        x = x.view(B, H // 2, 2, W // 2, 2, C).permute(0, 1, 3, 4, 2, 5).reshape(B, H // 2, W // 2, 4 * C)
        return self.reduction(self.norm(x))


class SwinStage(nn.Module):
    """Optional patch merging, then `depth` blocks alternating W-MSA and SW-MSA."""

    def __init__(self, dim: int, depth: int, num_heads: int, resolution: int, window_size: int,
                 mlp_ratio: float, drop_path: list[float], downsample: bool, attention: AttnKernel) -> None:
        super().__init__()
        self.downsample = PatchMerging(dim // 2) if downsample else nn.Identity()
        # On maps no larger than the window, the window covers the map and shifting is pointless.
        ws = min(window_size, resolution)
        shift = 0 if resolution <= window_size else window_size // 2
        self.blocks = nn.Sequential(*[
            SwinBlock(dim, num_heads, ws, 0 if i % 2 == 0 else shift, mlp_ratio, drop_path[i], attention,
                      input_size=(resolution, resolution))
            for i in range(depth)
        ])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.downsample(x))


class SwinEncoder(nn.Module):
    """Swin Transformer returning one NCHW feature map per stage (strides 4, 8, 16, 32).

    `feature_info` lists `num_chs`, `reduction` and `module` for each output (timm style).
    `attention` is the window-attention kernel (`sdpa`, `explicit`, or `auto`: `DEFAULT_KERNEL`
    until `set_attention` applies the choice for a device and precision).
    """

    def __init__(self, img_size: int = 256, in_chans: int = 1, patch_size: int = 4, embed_dim: int = 96,
                 depths: tuple[int, ...] = (2, 2, 6, 2), num_heads: tuple[int, ...] = (3, 6, 12, 24),
                 window_size: int = 7, mlp_ratio: float = 4.0, drop_path_rate: float = 0.1,
                 attention: AttnImpl = "auto", grad_checkpoint: CheckpointMode = "none") -> None:
        super().__init__()
        if attention != "auto":
            check_kernel(attention)
        kernel = DEFAULT_KERNEL if attention == "auto" else attention
        self.patch_embed = PatchEmbed(in_chans, embed_dim, patch_size)
        rates = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        self.feature_info: list[dict] = []
        start = 0
        for i, (depth, heads) in enumerate(zip(depths, num_heads)):
            dim = embed_dim * 2 ** i
            reduction = patch_size * 2 ** i
            self.stages.append(SwinStage(dim, depth, heads, img_size // reduction, window_size, mlp_ratio,
                                         rates[start:start + depth], downsample=i > 0, attention=kernel))
            self.feature_info.append({"num_chs": dim, "reduction": reduction, "module": f"stages.{i}"})
            start += depth
        self.norm = nn.LayerNorm(embed_dim * 2 ** (len(depths) - 1))
        self.apply(_init_weights)
        self.set_grad_checkpointing(grad_checkpoint)
        log.debug("Swin encoder: attention=%s (kernel %s), grad_checkpoint=%s", attention, kernel, grad_checkpoint)

    def set_attention(self, kernel: AttnKernel) -> None:
        """Run every window attention with `kernel` (`sdpa`, `explicit` or `flex`)."""
        check_kernel(kernel)
        for m in self.modules():
            if isinstance(m, WindowAttention):
                m.set_attention(kernel)

    @property
    def attention(self) -> AttnKernel:
        """The kernel the window attentions run (`set_attention` sets them all alike)."""
        return next(m.attention for m in self.modules() if isinstance(m, WindowAttention))

    def set_grad_checkpointing(self, mode: CheckpointMode = "block") -> None:
        """Recompute activations in backward per window attention, or per block (whole or
        selectively; see `mtlxray.model.recompute`)."""
        if mode not in CHECKPOINT_MODES:
            raise ValueError(f"grad_checkpoint must be one of {'|'.join(CHECKPOINT_MODES)}, got {mode!r}")
        for m in self.modules():
            if isinstance(m, SwinBlock):
                m.grad_checkpoint = mode

    def forward_intermediates(self, x: torch.Tensor, indices: Optional[list[int]] = None) -> list[torch.Tensor]:
        """(B, Cin, H, W) -> NCHW maps of the stages in `indices` (default all); the last is normed."""
        wanted = range(len(self.stages)) if indices is None else indices
        x = self.patch_embed(x)  # B, H/4, W/4, D
        out = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i == len(self.stages) - 1:
                x = self.norm(x)
            if i in wanted:
                out.append(x.permute(0, 3, 1, 2))  # B, C, h, w
        return out

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return self.forward_intermediates(x)


def _init_weights(m: nn.Module) -> None:
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
        if m.bias is not None:
            nn.init.zeros_(m.bias)

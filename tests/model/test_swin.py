import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from mtlxray.model.swin import SwinBlock, SwinEncoder, WindowAttention, window_layout, window_partition


def _reference_window_attn(block: SwinBlock, x: torch.Tensor) -> torch.Tensor:
    """Plain shifted-window attention: pad, roll, full attention over all tokens with an explicit
    -inf mask (other window, other shift region, or a padding key), relative bias per pair, roll
    back, crop."""
    B, H, W, C = x.shape
    ws, s = block.window_size, block.shift_size
    attn = block.attn
    h = attn.num_heads
    d = C // h
    Hp, Wp = math.ceil(H / ws) * ws, math.ceil(W / ws) * ws
    y = F.pad(block.norm1(x), (0, 0, 0, Wp - W, 0, Hp - H))
    y = torch.roll(y, shifts=(-s, -s), dims=(1, 2))
    L = Hp * Wp
    rows = torch.arange(Hp).repeat_interleave(Wp)
    cols = torch.arange(Wp).repeat(Hp)

    def band(v: torch.Tensor, n: int) -> torch.Tensor:
        return (v >= n - ws).long() + (v >= n - s).long() if s else torch.zeros_like(v)

    window = (rows // ws) * (Wp // ws) + cols // ws
    region = band(rows, Hp) * 3 + band(cols, Wp)
    is_pad = torch.roll((torch.arange(Hp) >= H)[:, None] | (torch.arange(Wp) >= W)[None, :], (-s, -s), (0, 1))
    allowed = (window[:, None] == window[None, :]) & (region[:, None] == region[None, :])
    allowed &= ~is_pad.flatten()[None, :] | torch.eye(L, dtype=torch.bool)
    dr = rows[:, None] % ws - rows[None, :] % ws + ws - 1
    dc = cols[:, None] % ws - cols[None, :] % ws + ws - 1
    bias = attn.relative_position_bias_table[dr * (2 * ws - 1) + dc]  # L, L, h
    out = torch.empty(B, L, C)
    for b in range(B):
        qkv = attn.qkv(y[b].reshape(L, C)).view(L, 3, h, d)
        for head in range(h):
            q, k, v = qkv[:, 0, head], qkv[:, 1, head], qkv[:, 2, head]
            scores = q @ k.T / math.sqrt(d) + bias[:, :, head]
            scores = scores.masked_fill(~allowed, float("-inf"))
            out[b, :, head * d:(head + 1) * d] = scores.softmax(-1) @ v
    out = attn.proj(out).view(B, Hp, Wp, C)
    out = torch.roll(out, shifts=(s, s), dims=(1, 2))
    return out[:, :H, :W]


def test_swin_t_encoder_has_27_52m_params():
    n = sum(p.numel() for p in SwinEncoder().parameters())
    assert abs(n - 27.52e6) / 27.52e6 < 0.005, n


def test_encoder_outputs_nchw_maps_at_strides_4_to_32():
    enc = SwinEncoder(img_size=64, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4)).eval()
    with torch.no_grad():
        feats = enc(torch.rand(2, 1, 64, 64))
    assert [tuple(f.shape) for f in feats] == [(2, 12, 16, 16), (2, 24, 8, 8), (2, 48, 4, 4), (2, 96, 2, 2)]
    assert [(i["num_chs"], i["reduction"]) for i in enc.feature_info] == [(12, 4), (24, 8), (48, 16), (96, 32)]
    assert len(enc.forward_intermediates(torch.rand(1, 1, 64, 64), indices=[3])) == 1


def test_maps_not_larger_than_window_use_map_as_window_without_shift():
    enc = SwinEncoder(embed_dim=12, num_heads=(1, 2, 2, 4))  # 256 input: maps 64, 32, 16, 8, window 7
    assert [[(b.window_size, b.shift_size) for b in st.blocks][:2] for st in enc.stages] == [[(7, 0), (7, 3)]] * 4
    small = SwinEncoder(img_size=64, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4))
    assert [(b.window_size, b.shift_size) for b in small.stages[3].blocks] == [(2, 0), (2, 0)]


def test_window_partition_splits_into_row_major_windows():
    x = torch.randn(2, 14, 21, 5)
    w = window_partition(x, 7)
    assert w.shape == (2, 6, 49, 5)
    assert torch.equal(w[0, 1].view(7, 7, 5), x[0, :7, 7:14])
    assert torch.equal(w[1, 5].view(7, 7, 5), x[1, 7:, 14:])


def test_window_layout_gathers_each_map_token_once_and_scatters_back():
    gather, scatter, blocked = window_layout(10, 9, 4, 2, torch.device("cpu"))
    assert gather.shape == (9 * 16,) and blocked.shape == (9, 16, 16)
    assert torch.equal(gather[scatter], torch.arange(90))  # every map token round-trips
    assert not blocked.diagonal(dim1=1, dim2=2).any()  # a slot always sees itself
    assert window_layout(8, 8, 4, 0, torch.device("cpu"))[2] is None  # no shift, no padding: no mask


@pytest.mark.parametrize("attention", ["sdpa", "explicit", "flex"])
@pytest.mark.parametrize("shift", [0, 2])
def test_shifted_window_attention_matches_plain_reference_on_padded_map(attention, shift):
    torch.manual_seed(0)
    block = SwinBlock(dim=8, num_heads=2, window_size=4, shift_size=shift, attention=attention)
    with torch.no_grad():  # a non-trivial bias so a wrong bias index would show
        block.attn.relative_position_bias_table.normal_()
    x = torch.randn(2, 10, 9, 8)  # padded to 12×12 = 3×3 windows of 4
    with torch.no_grad():
        got = block._window_attn(x)
        want = _reference_window_attn(block, x)
    assert got.shape == x.shape
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_sdpa_and_explicit_attention_agree_forward_and_backward_and_flex_forward():
    """flex has no backward on CPU (torch raises NotImplementedError); its backward is compared on
    a GPU in tests/gpu/test_sdpa_gpu.py."""
    torch.manual_seed(0)
    kernels = ("sdpa", "explicit", "flex")
    blocks = {a: SwinBlock(dim=16, num_heads=2, window_size=7, shift_size=3, attention=a) for a in kernels}
    with torch.no_grad():
        blocks["sdpa"].attn.relative_position_bias_table.normal_()
    for a in kernels[1:]:
        blocks[a].load_state_dict(blocks["sdpa"].state_dict())
    x = torch.randn(2, 16, 16, 16)  # padded to 21×21, shifted: bias and mask both live
    outs, grads = {}, {}
    for a in ("sdpa", "explicit"):
        xi = x.clone().requires_grad_(True)
        outs[a] = blocks[a](xi)
        outs[a].square().sum().backward()
        grads[a] = (xi.grad, blocks[a].attn.relative_position_bias_table.grad)
    with torch.no_grad():
        outs["flex"] = blocks["flex"](x)
    for a in ("sdpa", "flex"):
        torch.testing.assert_close(outs[a], outs["explicit"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(grads["sdpa"], grads["explicit"], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_window_layout_equals_the_former_layout_forward_and_backward(attention):
    """q, k, v gathered head-major in one copy give the outputs and gradients of the former
    window-major layout (mtlxray.bench.attention's baseline): fp32 to 1e-6, bf16 autocast loosely."""
    from mtlxray.bench.attention import with_former_layout

    torch.manual_seed(0)
    block = SwinBlock(dim=16, num_heads=2, window_size=4, shift_size=2, attention=attention, input_size=(10, 9))
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    former = with_former_layout(block)
    x = torch.randn(2, 10, 9, 16)  # padded to 12×12, shifted: bias and mask both live
    for dtype, tol in ((torch.float32, 1e-6), (torch.bfloat16, 3e-2)):  # torch 2.11 reaches 0.022 in bf16
        results = []
        for b in (block, former):
            xi = x.clone().requires_grad_(True)
            with torch.autocast("cpu", dtype, enabled=dtype == torch.bfloat16):
                out = b(xi)
            out.float().square().sum().backward()
            results.append([out.float(), xi.grad] + [p.grad.clone() for p in b.parameters()])
            b.zero_grad()
        for got, want in zip(*results):
            torch.testing.assert_close(got, want, atol=tol, rtol=tol)


def test_kernel_is_fixed_at_construction_and_switched_only_by_set_attention(monkeypatch):
    import mtlxray.hardware as hw

    def no_hardware_checks(*_a, **_k):
        raise AssertionError("the model consulted the hardware")

    monkeypatch.setattr(hw, "cpu_has_native_bf16", no_hardware_checks)
    calls = []
    real_sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real_sdpa(*a, **k))
    kw = dict(img_size=32, embed_dim=8, depths=(2, 2, 2, 2), num_heads=(1, 1, 2, 2), window_size=4)
    enc = SwinEncoder(**kw, attention="explicit").eval()
    x = torch.rand(1, 1, 32, 32)
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        enc(x)  # bf16 on any CPU: still the configured kernel
    assert not calls and enc.attention == "explicit"
    enc.set_attention("sdpa")
    with torch.no_grad():
        enc(x)
    n_attn = sum(isinstance(m, WindowAttention) for m in enc.modules())
    assert len(calls) == n_attn and enc.attention == "sdpa"
    assert SwinEncoder(**kw).attention == "sdpa"  # `auto` runs SDPA until resolved by the builder


def test_window_attention_takes_only_a_resolved_kernel():
    with pytest.raises(ValueError, match="resolve `auto` first"):
        SwinBlock(dim=8, num_heads=2, window_size=4, attention="auto")
    with pytest.raises(ValueError, match="sdpa|explicit"):
        SwinEncoder(img_size=32, embed_dim=8, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), attention="flash")


def test_model_package_imports_nothing_from_hardware():
    import ast
    import pathlib

    import mtlxray.model

    for path in pathlib.Path(mtlxray.model.__file__).parent.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            assert not any(n == "mtlxray.hardware" or n.startswith("mtlxray.hardware.") for n in names), path


def test_shifted_padded_block_traces_and_exports_without_in_place_mask_ops():
    """The layout is built inside the trace when its size is not cached yet; an in-place `&=`
    there was `aten::__iand_`, which no ONNX opset has."""
    import io
    import warnings

    block = SwinBlock(dim=8, num_heads=2, window_size=4, shift_size=2, attention="explicit").eval()
    x = torch.randn(2, 10, 9, 8)  # padded to 12×12, shifted: the mask is live
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit's deprecation, the tracer's note on bool(blocked.any())
        traced = torch.jit.trace(block, x, check_trace=False)
        assert "__iand_" not in str(traced.inlined_graph)
        torch.onnx.export(SwinBlock(dim=8, num_heads=2, window_size=4, shift_size=2, attention="explicit").eval(),
                          (x,), io.BytesIO(), dynamo=False, opset_version=17)


def test_window_layout_is_buffers_built_for_the_configured_size_and_rebuilt_for_another():
    block = SwinBlock(dim=8, num_heads=2, window_size=4, shift_size=2, attention="sdpa", input_size=(10, 10))
    attn = block.attn
    assert attn.input_size == (10, 10) and attn.attn_mask.shape == (9, 1, 16, 16)  # padded to 12×12
    assert {"attn.window_gather", "attn.window_scatter", "attn.attn_mask"} <= dict(block.named_buffers()).keys()
    assert not any("window" in k or "attn_mask" in k for k in block.state_dict())  # non-persistent
    with torch.no_grad():
        block(torch.randn(1, 8, 8, 8))  # another size: rebuilt
        assert attn.input_size == (8, 8) and attn.attn_mask.shape == (4, 1, 16, 16)
        with torch.autocast("cpu", torch.bfloat16):
            out = block(torch.randn(1, 8, 8, 8))
    assert torch.isfinite(out).all()
    assert SwinBlock(dim=8, num_heads=2, window_size=4, input_size=(8, 8)).attn.attn_mask is None  # nothing blocked


@pytest.mark.parametrize("mode", ["attention", "block"])
def test_grad_checkpointing_gradients_equal_plain(mode):
    kw = dict(img_size=64, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), drop_path_rate=0.2)
    plain, ckpt = SwinEncoder(**kw), SwinEncoder(**kw, grad_checkpoint=mode)
    ckpt.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 64, 64)
    grads = []
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same stochastic-depth draws
        sum(f.square().mean() for f in model(x)).backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, atol=1e-6, rtol=1e-6, msg=name)


def test_unknown_checkpoint_mode_is_rejected():
    with pytest.raises(ValueError, match="grad_checkpoint"):
        SwinEncoder(img_size=64, embed_dim=12, depths=(2, 2, 2, 2), num_heads=(1, 2, 2, 4), grad_checkpoint="all")


class _OpLog(TorchDispatchMode):
    """Every aten op run inside, with its arguments and output. Tensors are kept by reference, so
    one changed in place later shows the change; the tests here read only layouts and dtypes."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, tuple, object]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.calls.append((str(func.overloadpacket), args, out))
        return out


def _shifted_padded_block(attention: str) -> SwinBlock:
    torch.manual_seed(0)
    block = SwinBlock(dim=16, num_heads=2, window_size=4, shift_size=2, attention=attention, input_size=(10, 9))
    with torch.no_grad():
        block.attn.relative_position_bias_table.normal_()
    return block


@pytest.mark.parametrize("attention", ["sdpa", "explicit"])
def test_window_gathers_backward_reads_each_tokens_slot_without_index_add_and_equals_torchs(attention, monkeypatch):
    """Torch's backward of the window gathers zero-fills and accumulates with index_add_ (four
    passes); theirs reads each token's gradient from its slot. Gradients are bit-identical in fp32:
    the padding slots, which also read token 0, receive exactly zero gradient."""
    from mtlxray.model import swin

    block = _shifted_padded_block(attention)
    x = torch.randn(2, 10, 9, 16)  # padded to 12×12, shifted: padding slots and the mask both live
    grads = {}
    for own in (True, False):
        monkeypatch.setattr(swin, "with_own_backward", lambda own=own: own)
        xi = x.clone().requires_grad_(True)
        out = block(xi)
        with _OpLog() as ops:
            out.square().sum().backward()
        if own:
            assert not [name for name, _, _ in ops.calls if name.startswith("aten.index_add")]
        grads[own] = [xi.grad] + [p.grad.clone() for p in block.parameters()]
        block.zero_grad()
    for got, want in zip(grads[True], grads[False]):
        assert torch.equal(got, want)


def test_explicit_attention_adds_a_contiguous_bias_and_keeps_no_fp32_copy_of_the_map_in_bf16():
    """A permuted bias made the add over the (B, heads, nW, N, N) map a strided walk (10× slower on
    CPU), and a softmax to fp32 then back copied the map twice; under bf16 autocast the map stays
    bf16 from the scores to the product with v."""
    block = _shifted_padded_block("explicit")
    x = torch.randn(2, 10, 9, 16, requires_grad=True)
    with _OpLog() as ops, torch.autocast("cpu", dtype=torch.bfloat16):
        block(x)
    N = block.window_size ** 2

    def is_map(t) -> bool:
        return isinstance(t, torch.Tensor) and t.dim() == 5 and tuple(t.shape[-2:]) == (N, N)

    adds = [args for name, args, _ in ops.calls if name in ("aten.add", "aten.add_") and is_map(args[0])]
    assert adds and all(args[1].is_contiguous() for args in adds)
    maps = [out for _, _, out in ops.calls if is_map(out)]
    assert maps and {m.dtype for m in maps} == {torch.bfloat16}

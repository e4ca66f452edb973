import copy
import json
import os
import sys
from pathlib import Path

import killable
import pytest
import torch
import torch.nn as nn

from mtlxray.model.heads import ClassHead, MaskHead, pooled_conv_bn_relu


def _numel(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_mask_head_is_bias_free_3x3_bn_then_1x1_with_the_papers_10441_params():
    head = MaskHead(48, 24)
    assert (head.conv.kernel_size, head.conv.in_channels, head.conv.out_channels) == ((3, 3), 48, 24)
    assert head.conv.bias is None and isinstance(head.bn, nn.BatchNorm2d)
    assert (head.out.kernel_size, head.out.in_channels, head.out.out_channels) == ((1, 1), 24, 1)
    assert _numel(head) == 10_441  # 48·24·9 + 2·24 + 24 + 1: the paper's 10.44K
    assert head(torch.randn(2, 48, 16, 16), (32, 32)).shape == (2, 1, 32, 32)


def test_class_head_holds_both_phase_convs_in_2_18k_params():
    head = ClassHead(64, 3)
    assert _numel(head) == 640 + 1216 + 128 + 195
    assert head.conv_phase1.in_channels == 1 and head.conv_phase2.in_channels == 2


def test_class_head_set_mode_freezes_only_the_idle_conv():
    head = ClassHead(8, 3)
    assert not head.conv_phase2.weight.requires_grad and head.conv_phase1.weight.requires_grad
    head.set_mode("phase2")
    assert head.conv_phase2.weight.requires_grad and not head.conv_phase1.weight.requires_grad
    head.set_mode("phase1")
    assert head.conv_phase1.weight.requires_grad and not head.conv_phase2.weight.requires_grad


def test_class_head_uses_the_conv_matching_the_mask_count():
    head = ClassHead(8, 3)
    head.set_mode("phase2")
    head(torch.rand(2, 2, 16, 16)).sum().backward()
    assert head.conv_phase2.weight.grad is not None and head.conv_phase1.weight.grad is None


def test_class_head_bottleneck_option_feeds_pooled_features_to_fc():
    head = ClassHead(8, 3, bottleneck_chs=5)
    assert head.fc.in_features == 13
    logits = head(torch.rand(2, 1, 16, 16), torch.randn(2, 5))
    assert logits.shape == (2, 3)


def test_phase2_conv_started_from_phase1_computes_what_phase1_learned():
    torch.manual_seed(0)
    head = ClassHead(8, 3).eval()
    torch.nn.init.normal_(head.conv_phase1.weight)
    lung, inf = torch.rand(2, 1, 16, 16), torch.rand(2, 1, 16, 16)
    phase1 = head(lung)
    head.init_phase2_from_phase1()
    head.set_mode("phase2")
    assert torch.allclose(head(torch.cat([lung, inf], dim=1)), phase1, atol=1e-6)
    assert torch.count_nonzero(head.conv_phase2.weight[:, 1]) == 0


def _modules_pooling(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    return torch.relu(bn(conv(x))).mean(dim=(2, 3))


def _folded(x: torch.Tensor, conv: nn.Conv2d, bn: nn.BatchNorm2d) -> torch.Tensor:
    return pooled_conv_bn_relu(x, conv, bn, fold=True)


def _head(seed: int = 0) -> ClassHead:
    torch.manual_seed(seed)
    head = ClassHead(16, 3)
    head.set_mode("phase2")
    for t in (head.bn.weight, head.bn.bias, head.conv_phase2.bias):
        nn.init.normal_(t, 0.5, 0.5)  # away from BN's 1/0 and the conv's small bias: every term counts
    return head


@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("training", [True, False])
def test_class_head_pooling_computes_conv_bn_relu_mean_and_the_same_running_statistics(training, momentum):
    """In float64, where both are exact to ~1e-12: output, input and parameter gradients, and the
    batch norm's running statistics after two steps (momentum None: the cumulative average)."""
    head = _head().double().train(training)
    head.bn.momentum = momentum
    modules = copy.deepcopy(head)
    x = torch.rand(3, 2, 12, 10, dtype=torch.float64)
    weights = torch.randn(3, 16, dtype=torch.float64)
    results = []
    for pool in (_folded, _modules_pooling):
        h = head if pool is _folded else modules
        for _ in range(2):
            xi = x.clone().requires_grad_(True)
            out = pool(xi, h.conv_phase2, h.bn)
            (out * weights).sum().backward()
        results.append([out, xi.grad, h.conv_phase2.weight.grad, h.bn.weight.grad, h.bn.bias.grad,
                        h.bn.running_mean, h.bn.running_var, h.bn.num_batches_tracked])
    for got, want in zip(*results):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12)
    assert torch.allclose(head.conv_phase2.bias.grad, modules.conv_phase2.bias.grad, atol=1e-12)


def test_class_head_pooling_without_a_backward_and_with_channels_last_weights_computes_the_same():
    head = _head()
    x = torch.rand(2, 2, 16, 16)
    with_grad = _folded(x.clone().requires_grad_(True), head.conv_phase2, head.bn)
    with torch.no_grad():
        plain = _folded(x, head.conv_phase2, head.bn)
        head.to(memory_format=torch.channels_last)  # the weights non-contiguous
        channels_last = _folded(x, head.conv_phase2, head.bn)
    assert torch.allclose(plain, with_grad.detach(), rtol=1e-6, atol=1e-7)
    assert torch.allclose(channels_last, plain, rtol=1e-6, atol=1e-7)


def test_class_head_keeps_a_third_less_for_backward_than_its_modules_at_the_papers_width():
    """Conv output and normed map (64 floats a pixel each) against the patches and one map."""
    head = ClassHead(64, 3)
    head.set_mode("phase2")
    masks = torch.rand(2, 2, 32, 32, requires_grad=True)

    def saved_bytes(forward) -> int:
        seen: dict = {}

        def pack(t: torch.Tensor) -> torch.Tensor:
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            forward()
        return sum(seen.values())

    ours = saved_bytes(lambda: head(masks))
    modules = saved_bytes(lambda: head.fc(_modules_pooling(masks, head.conv_phase2, head.bn)))
    assert ours <= 0.7 * modules, (ours, modules)


def test_class_head_conv_gradient_is_closer_to_float64_than_through_the_modules():
    """Through the norm's backward the conv weights' gradient is a sum over every pixel of terms
    that nearly cancel; from the folded product it is not. Saturated masks, 2×128²."""
    torch.manual_seed(0)
    head = ClassHead(64, 3)
    head.set_mode("phase2")
    probs = torch.sigmoid(3 * torch.randn(2, 2, 128, 128))
    weights = torch.randn(2, 64)

    def conv_grad(pool, dtype):
        h = copy.deepcopy(head).to(dtype)
        (pool(probs.to(dtype), h.conv_phase2, h.bn) * weights.to(dtype)).sum().backward()
        return h.conv_phase2.weight.grad.double()

    exact = conv_grad(_modules_pooling, torch.float64)
    errors = {pool.__name__: float((conv_grad(pool, torch.float32) - exact).abs().max() / exact.abs().max())
              for pool in (_folded, _modules_pooling)}
    assert errors["_folded"] * 3 < errors["_modules_pooling"], errors


@pytest.mark.parametrize(("channels", "phase", "folds"), [
    (64, "phase1", True), (64, "phase2", True), (32, "phase1", True), (32, "phase2", False), (8, "phase1", False)])
def test_class_head_folds_where_its_map_has_at_least_twice_the_patch_values(channels, phase, folds):
    """C ≥ 2·(9·Cin + 1): the paper's 64 channels in both phases; the narrow heads call their modules."""
    head = ClassHead(channels, 3)
    head.set_mode(phase)
    conv = head.conv_phase1 if phase == "phase1" else head.conv_phase2
    calls = []
    conv.register_forward_hook(lambda m, a, out: calls.append(out.shape))
    head(torch.rand(2, conv.in_channels, 8, 8)).sum().backward()
    assert (not calls) == folds


def test_class_head_pooling_refuses_a_conv_it_does_not_compute():
    head = _head()
    with pytest.raises(ValueError, match="3×3 'same' conv"):
        pooled_conv_bn_relu(torch.rand(1, 2, 8, 8), nn.Conv2d(2, 16, 3, padding=0), head.bn)


@pytest.mark.distributed
def test_class_head_under_zero3_gets_its_childrens_partitioned_weights(tmp_path):
    """ZeRO-3 gathers a parameter around its own module's forward; the folded head reads its conv's
    and norm's weights without calling them, which DeepSpeed's parameter getter detects, registers
    and gathers. Every parameter partitioned (persistence threshold 0): same output and gradient."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    res = killable.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1",
                        str(Path(__file__).parents[1] / "_zero3_class_head.py"), str(tmp_path)], env=env, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    result = json.loads((tmp_path / "result.json").read_text())
    assert all(result["partitioned"]) and "error" not in result, result
    assert result["max_abs_diff"] < 1e-6 and result["max_abs_grad_diff"] < 1e-9, result

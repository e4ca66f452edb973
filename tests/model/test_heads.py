import torch
import torch.nn as nn

from mtlxray.model.heads import ClassHead, MaskHead


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

import pytest
import torch

from mtlxray.model.decoder import PPM, CrossAttention, DecoderBranch, UpConv

SWIN_T_SKIPS = [384, 192, 96]
PAPER_DECODERS = 14.77e6


def _numel(m: torch.nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_ppm_has_about_1_78m_params_and_keeps_the_bottleneck_shape():
    ppm = PPM(768, (1, 2, 3, 6), 192)
    assert abs(_numel(ppm) - 1.78e6) / 1.78e6 < 0.01
    small = PPM(16, (1, 2, 3, 6), 4).eval()
    assert small(torch.randn(2, 16, 8, 8)).shape == (2, 16, 8, 8)


def test_upconv_doubles_resolution_and_concatenates_the_skip():
    up = UpConv(16, 8, 12)
    assert up.conv[0][0].in_channels == 24
    assert up(torch.randn(2, 16, 4, 4), torch.randn(2, 8, 8, 8)).shape == (2, 12, 8, 8)
    assert UpConv(16, 0, 12)(torch.randn(2, 16, 4, 4)).shape == (2, 12, 8, 8)


def test_two_decoder_branches_total_14_77m_with_7_03m_of_upconvs_each():
    branches = [DecoderBranch(768, SWIN_T_SKIPS, [384, 192, 96, 48], [8, 4, 2, 1]) for _ in range(2)]
    total = sum(_numel(b) for b in branches)
    assert abs(total - PAPER_DECODERS) / PAPER_DECODERS < 0.02, total
    assert abs(_numel(branches[0].stages) - 7.03e6) / 7.03e6 < 0.01
    assert [c.heads for c in branches[0].cross] == [8, 4, 2, 1]
    assert branches[0].stages[3].conv[0][0].in_channels == 96  # 128² stage: no encoder skip


def test_cross_attention_gates_from_the_other_branch_and_keeps_shape():
    torch.manual_seed(0)
    ca = CrossAttention(16, heads=4).eval()
    x = torch.randn(2, 16, 8, 8)
    other = torch.randn(2, 16, 8, 8, requires_grad=True)
    out = ca(x, other)
    assert out.shape == x.shape
    out.square().sum().backward()
    assert other.grad.abs().sum() > 0
    assert not torch.allclose(ca(x, torch.randn(2, 16, 8, 8)), out)


def test_cross_attention_rejects_heads_not_dividing_channels():
    with pytest.raises(ValueError, match="heads"):
        CrossAttention(10, heads=4)

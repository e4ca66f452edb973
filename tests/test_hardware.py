"""`auto` precision: bf16 only where the device runs it natively; an explicit bf16 is kept, with a
warning. `auto` attention: the measured kernel per device and precision, decided here, once."""

import logging

import pytest
import torch

import mtlxray.hardware as hw


def test_auto_precision_follows_native_bf16(monkeypatch):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: True)
    assert hw.resolve_precision("auto", "cpu") == "bf16"
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    assert hw.resolve_precision("auto", "cpu") == "fp32"
    assert hw.resolve_precision("fp32", "cpu") == "fp32"


def test_explicit_bf16_without_native_support_is_kept_with_a_warning(monkeypatch, caplog):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.WARNING, logger="mtlxray.hardware"):
        assert hw.resolve_precision("bf16", "cpu") == "bf16"
    assert "without native bf16" in caplog.text and "run.precision=auto" in caplog.text


def test_auto_attention_resolves_per_device_and_dtype(monkeypatch):
    for native_bf16, expected in ((True, "explicit"), (False, "sdpa")):
        monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: native_bf16)
        assert hw.resolve_attention("auto", torch.bfloat16, "cpu") == expected
        assert hw.resolve_attention("auto", "bf16", "cpu") == expected  # run.precision values too
    assert hw.resolve_attention("auto", torch.float32, "cpu") == "explicit"
    assert hw.resolve_attention("auto", "fp32", "cpu") == "explicit"
    assert hw.resolve_attention("auto", torch.float32, "cuda") == "sdpa"
    assert hw.resolve_attention("auto", torch.bfloat16, "cuda") == "sdpa"


def test_auto_follows_the_first_matching_row_of_the_measurement_table(monkeypatch):
    expected = {  # (device, dtype, native bf16) -> today's kernel
        ("cpu", "fp32", True): "explicit", ("cpu", "fp32", False): "explicit",
        ("cpu", "bf16", True): "explicit", ("cpu", "bf16", False): "sdpa",
        ("cpu", "fp16", True): "explicit", ("cuda", "fp32", True): "sdpa", ("cuda", "bf16", True): "sdpa",
        ("mps", "fp32", True): "sdpa",
    }
    for (device, dtype, native), kernel in expected.items():
        monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: native)
        row = hw.attention_choice(dtype, device)
        assert row in hw.ATTENTION_TABLE and row.kernel == kernel == hw.resolve_attention("auto", dtype, device)
        assert "bench" in row.measured or "tests/gpu" in row.measured  # each row names its measurement
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    assert hw.attention_choice(torch.bfloat16, "cpu").describe("cpu", "bf16").startswith(
        "cpu, bf16, AVX2 only (no native bf16): sdpa 7.0× explicit")


def test_a_configured_kernel_wins_and_nonsense_is_refused(monkeypatch):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: True)
    assert hw.resolve_attention("sdpa", torch.bfloat16, "cpu") == "sdpa"
    assert hw.resolve_attention("explicit", torch.float32, "cuda") == "explicit"
    with pytest.raises(ValueError, match="model.attention"):
        hw.resolve_attention("flash", torch.float32, "cpu")
    with pytest.raises(ValueError, match="precision"):
        hw.resolve_attention("auto", "auto", "cpu")


def test_resolved_kernel_is_logged_with_its_reason(monkeypatch, caplog):
    monkeypatch.setattr(hw, "cpu_has_native_bf16", lambda: False)
    with caplog.at_level(logging.INFO, logger="mtlxray.hardware"):
        hw.resolve_attention("auto", "bf16", "cpu")
    assert "window attention: sdpa" in caplog.text and "native bf16" in caplog.text


def test_model_applies_the_resolved_kernel_to_every_window_attention():
    from mtlxray.config import load_config
    from mtlxray.model import build_model
    from mtlxray.model.swin import WindowAttention

    cfg = load_config(None, ["model.img_size=32", "model.embed_dim=8", "model.depths=[1,1,1,1]",
                             "model.num_heads=[1,1,1,1]", "model.window_size=4", "model.decoder_channels=[16,8,8,8]",
                             "model.cross_attn_heads=[1,1,1,1]", "model.ppm_channels=8"])
    model = build_model(cfg.model, pretrained=False)
    model.set_attention(hw.resolve_attention(cfg.model.attention, "fp32", "cpu"))
    kernels = {m.attention for m in model.modules() if isinstance(m, WindowAttention)}
    assert kernels == {"explicit"} and model.attention_kernel == "explicit"


def test_flex_attention_is_refused_on_cpu_in_one_named_line():
    from mtlxray.errors import ConfigError
    from mtlxray.hardware import resolve_attention

    with pytest.raises(ConfigError, match="flex.*no backward on CPU"):
        resolve_attention("flex", "fp32", "cpu")
    assert resolve_attention("flex", "bf16", "cuda") == "flex"

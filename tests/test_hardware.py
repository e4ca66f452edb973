"""`auto` precision: bf16 only where the device runs it natively; an explicit bf16 is kept, with a warning."""

import logging

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

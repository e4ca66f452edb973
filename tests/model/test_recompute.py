"""Activation checkpointing: every mode gives the gradients and batch-norm statistics of no
checkpointing, keeps fewer activations, and selective mode saves only compute-bound outputs."""

import pytest
import torch

import mtlxray.model.recompute as ckpt
from _model_support import tiny_config
from mtlxray.errors import ConfigError
from mtlxray.model import build_model


def _step(mode: str) -> tuple[dict, dict, int]:
    """One phase-2 forward+backward of the tiny model: (grads, buffers, bytes saved for backward
    outside checkpointed segments)."""
    torch.manual_seed(0)
    model = build_model(tiny_config(grad_checkpoint=mode))
    model.set_mode("phase2")
    model.train()
    x = torch.rand(2, 1, 32, 32, generator=torch.Generator().manual_seed(1))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        torch.manual_seed(2)  # the drop-path draws
        out = model(x)
    (out["lung"].mean() + out["inf"].mean() + out["cls"].mean()).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return grads, {n: b.clone() for n, b in model.named_buffers()}, sum(saved)


@pytest.fixture(scope="module")
def reference():
    return _step("none")


@pytest.mark.parametrize("mode", ["attention", "block", "selective"])
def test_mode_matches_no_checkpointing_and_keeps_fewer_activations(reference, mode):
    grads0, buffers0, saved0 = reference
    grads, buffers, saved = _step(mode)
    assert grads.keys() == grads0.keys()
    for name, g in grads0.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    for name, b in buffers0.items():  # running stats and counters updated exactly once
        assert torch.equal(buffers[name], b), name
    assert saved < saved0


def test_selective_mode_keeps_only_wide_contractions_and_recomputes_the_rest(monkeypatch):
    decisions = []
    policy = ckpt._policy

    def recording(ctx, op, *args, **kwargs):
        decision = policy(ctx, op, *args, **kwargs)
        decisions.append((op, ckpt._reduction(op, args), decision))
        return decision

    monkeypatch.setattr(ckpt, "_policy", recording)
    monkeypatch.setattr(ckpt, "MIN_SAVED_REDUCTION", 64)  # the tiny model's widths are 8-48
    _step("selective")
    must_save = ckpt.CheckpointPolicy.MUST_SAVE
    assert all((d == must_save) == (k >= 64) for _, k, d in decisions)
    aten = torch.ops.aten
    saved = {op for op, _, d in decisions if d == must_save}
    recomputed = {op for op, _, d in decisions if d != must_save}
    assert aten.convolution.default in saved and saved & {aten.mm.default, aten.addmm.default}
    assert aten.bmm.default in recomputed  # attention products over a head or a window
    assert any("batch_norm" in str(op) for op in recomputed) and aten.native_layer_norm.default in recomputed


def test_unknown_mode_is_a_config_error():
    model = build_model(tiny_config())
    with pytest.raises(ConfigError, match="grad_checkpoint must be one of none|attention|block|selective"):
        model.set_grad_checkpointing("everything")

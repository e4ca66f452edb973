"""mtlxray.eval.gate: a first-stage classifier gates by its own frozen predictions, and `evaluate` and `predict`
resolve their gate flags against the checkpoint's gate in one place."""

from pathlib import Path

import pytest
import torch

from mtlxray.config import load_config
from mtlxray.errors import ConfigError
from mtlxray.eval.gate import FirstStage, Gate, positive_probability, resolve_gate
from mtlxray.model import build_model

DEMO2 = Path(__file__).resolve().parents[2] / "configs" / "demo_phase2.yaml"
TINY_SWIN = ["model.img_size=64", "model.embed_dim=12", "model.depths=[1,1]", "model.num_heads=[1,2]",
             "model.window_size=4", "model.ppm_channels=16", "model.ppm_bins=[1,2]", "model.decoder_channels=[16,8]",
             "model.cross_attn_heads=[1,1]", "model.head_channels=8", "model.cls_channels=8"]


def _cfg(*extra: str):
    return load_config(DEMO2, [*TINY_SWIN, "phase.init_from=null", *extra])


def test_a_first_stage_checkpoint_gates_by_its_own_frozen_predictions(tmp_path):
    stage_cfg = _cfg("phase.name=phase1")
    torch.manual_seed(1)
    stage = build_model(stage_cfg.model, pretrained=False)
    stage.set_mode("phase1")
    folder = stage.save_pretrained(tmp_path / "classifier", stage_cfg)
    cfg = _cfg(f"model.first_stage={folder}", "phase.teacher_forcing={gate: first_stage, p: 0.0, threshold: 0.4}")
    gate = Gate.from_config(cfg, "cpu")
    assert isinstance(gate.first_stage, FirstStage)
    assert not any(p.requires_grad for p in gate.first_stage.model.parameters())
    img = torch.rand(6, 1, 64, 64)
    expected = positive_probability(stage.eval()(img)["cls"], [2])
    assert torch.allclose(gate.probability({"cls": None}, img), expected, atol=1e-6)
    assert torch.equal(gate.passes({"cls": None}, img), expected >= 0.4)
    with pytest.raises(ConfigError, match="has 3 classes, the model 2"):
        Gate.from_config(_cfg(f"model.first_stage={folder}", "model.num_classes=2", "phase.positive_classes=[1]",
                              "data.label_map={Normal: 0, Non-COVID: 0, COVID-19: 1}",
                              "data.class_names=[other, COVID-19]", "phase.teacher_forcing={gate: first_stage}"),
                         "cpu")


def test_the_gate_flags_override_the_checkpoints_gate_and_a_threshold_alone_gates_on_the_class_head():
    ungated = _cfg()
    assert ungated.phase.teacher_forcing.gate == "none" and resolve_gate(ungated) is None
    alone = resolve_gate(ungated, threshold=0.3)  # --gate 0.3 on a checkpoint trained without a gate
    assert (alone.source, alone.threshold) == ("cls_head", 0.3)
    gated = _cfg("phase.teacher_forcing={gate: cls_head, threshold: 0.6}")
    assert resolve_gate(gated).threshold == 0.6
    assert resolve_gate(gated, threshold=0.8).threshold == 0.8
    assert resolve_gate(gated, source="none") is None
    with pytest.raises(ConfigError, match="the first_stage gate needs a classification checkpoint"):
        resolve_gate(ungated, source="first_stage")

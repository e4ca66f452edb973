import pytest
import torch

from mtlxray.errors import ConfigError
from mtlxray.model import build_model
from mtlxray.train.trainer import Trainer
from mtlxray.train.phases import apply_freezing


def test_apply_freezing_freezes_exactly_the_prefixes(tiny_cfg):
    model = build_model(tiny_cfg().model)
    model.set_mode("phase2")  # everything trainable but phase 1's class input
    apply_freezing(model, ["inf_decoder", "inf_head"])
    for name, p in model.named_parameters():
        expected = not name.startswith(("inf_decoder.", "inf_head.", "cls_head.conv_phase1."))
        assert p.requires_grad == expected, name


def test_apply_freezing_unknown_prefix_is_a_config_error(tiny_cfg):
    model = build_model(tiny_cfg().model)
    with pytest.raises(ConfigError, match="inf_dec "):
        apply_freezing(model, ["inf_dec "])


def test_phase1_infection_params_bit_identical_after_training_steps(tiny_cfg):
    trainer = Trainer(tiny_cfg("schedule.max_steps=3"), resume="none")
    try:
        model = trainer.raw_model
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        assert trainer.fit() == 0
        after = dict(model.named_parameters())
    finally:
        trainer.close()
    infection = [n for n in before if n.startswith(("inf_decoder.", "inf_head."))]
    assert infection
    for n in infection:
        assert torch.equal(before[n], after[n]), n
    lung = [n for n in before if n.startswith(("lung_decoder.", "lung_head."))]
    assert all(not torch.equal(before[n], after[n]) for n in lung if after[n].ndim > 1)  # they did train


@pytest.mark.parametrize("bn_stats", ["update", "keep"])
def test_frozen_bn_stats_keep_holds_a_frozen_parts_running_statistics_exactly(tiny_cfg, bn_stats):
    """`keep`: a training-mode forward leaves the frozen class head's batch-norm statistics as they
    were while a trained part's move; `update` (plain requires_grad freezing) moves both."""
    model = build_model(tiny_cfg().model)
    model.set_mode("phase1")
    apply_freezing(model, ["cls_head"], bn_stats)
    frozen, trained = model.cls_head.bn, model.lung_head.bn
    before = [m.running_mean.clone() for m in (frozen, trained)]
    model.train()
    model(torch.rand(2, 1, 32, 32))
    assert not torch.equal(trained.running_mean, before[1])
    assert torch.equal(frozen.running_mean, before[0]) == (bn_stats == "keep")

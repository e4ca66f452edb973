import pytest

from mtlxray.errors import ConfigError
from mtlxray.model import build_model
from mtlxray.train.optim import build_optimizer, build_scheduler, cosine_factor, param_groups
from mtlxray.train.phases import prepare_phase

from _train_support import REPO


def _phase2(tiny_cfg):
    cfg = tiny_cfg("phase.init_from=null", phase2=True)
    model = build_model(cfg.model)
    prepare_phase(model, cfg.phase)
    return cfg, model


def test_phase2_param_groups_carry_5x_and_01x_ratios(tiny_cfg):
    cfg, model = _phase2(tiny_cfg)
    opt = build_optimizer(model, cfg)
    base = cfg.optim.lr
    by_name = {g["name"]: g for g in opt.param_groups}
    assert by_name["inf_decoder/decay"]["lr"] == pytest.approx(5 * base)
    assert by_name["inf_head/decay"]["lr"] == pytest.approx(5 * base)
    assert by_name["default/decay"]["lr"] == pytest.approx(0.1 * base)
    grouped = {id(p) for g in opt.param_groups for p in g["params"]}
    unused = {id(p) for n, p in model.named_parameters() if n.startswith("cls_head.conv_phase1.")}
    assert grouped == {id(p) for p in model.parameters()} - unused  # all that phase 2 uses trains
    for g in opt.param_groups:
        prefix = g["name"].split("/")[0]
        for p in g["params"]:
            name = next(n for n, q in model.named_parameters() if q is p)
            assert name.startswith(prefix + ".") or prefix == "default"


def test_schedule_keeps_the_ratios_between_groups(tiny_cfg):
    cfg, model = _phase2(tiny_cfg)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=20)
    for _ in range(7):
        opt.step()
        sched.step()
    by_name = {g["name"]: g["lr"] for g in opt.param_groups}
    assert by_name["inf_decoder/decay"] / by_name["default/decay"] == pytest.approx(50.0)


def test_norms_biases_and_position_tables_get_no_weight_decay(tiny_cfg):
    cfg, model = _phase2(tiny_cfg)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in param_groups(model, cfg):
        for p in g["params"]:
            exempt = p.ndim <= 1 or "relative_position_bias_table" in names[id(p)]
            assert (g["weight_decay"] == 0.0) == exempt, names[id(p)]


def test_phase1_optimizer_holds_no_frozen_parameter(tiny_cfg):
    cfg = tiny_cfg()
    model = build_model(cfg.model)
    prepare_phase(model, cfg.phase)
    grouped = {id(p) for g in build_optimizer(model, cfg).param_groups for p in g["params"]}
    frozen = {id(p) for n, p in model.named_parameters() if n.startswith(("inf_decoder.", "inf_head."))}
    assert frozen and not grouped & frozen


def test_lr_mult_prefix_matching_nothing_is_a_config_error(tiny_cfg):
    cfg = tiny_cfg("phase.lr_mult={inf_decodr: 5.0}")
    model = build_model(cfg.model)
    with pytest.raises(ConfigError, match="inf_decodr"):
        param_groups(model, cfg)


def test_cosine_factor_warms_up_then_decays_to_the_floor():
    f = [cosine_factor(s, total=10, warmup=2, floor=0.01) for s in range(11)]
    assert f[0] == pytest.approx(0.5) and f[1] == pytest.approx(1.0) and f[2] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(f[2:], f[3:]))
    assert f[10] == pytest.approx(0.01)


def test_scheduler_reaches_min_lr_at_the_last_step(tiny_cfg):
    cfg = tiny_cfg("schedule.warmup_steps=0")
    model = build_model(cfg.model)
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=5)
    for _ in range(5):
        opt.step()
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(cfg.schedule.min_lr)


def test_the_class_heads_phase2_conv_is_a_new_part_at_5x_in_the_paper_config():
    from mtlxray.config import load_config
    from mtlxray.train.phases import prepare_phase

    cfg = load_config(REPO / "configs" / "phase2.yaml")
    model = build_model(cfg.model, pretrained=False)
    prepare_phase(model, cfg.phase)
    groups = {n: g for g in param_groups(model, cfg) for n in _names(model, g)}
    for name in ("cls_head.conv_phase2.weight", "cls_head.conv_phase2.bias", "inf_head.conv.weight"):
        assert groups[name]["lr_mult"] == 5.0, name
    assert groups["cls_head.fc.weight"]["lr_mult"] == 0.1 and groups["encoder.norm.weight"]["lr_mult"] == 0.1


def _names(model, group) -> list[str]:
    ids = {id(p) for p in group["params"]}
    return [n for n, p in model.named_parameters() if id(p) in ids]


def test_every_parameter_decays_when_the_norm_and_bias_exemption_is_off(tiny_cfg):
    model = build_model(tiny_cfg().model)
    groups = param_groups(model, tiny_cfg("optim.no_decay_norm_bias=false"))
    assert {g["weight_decay"] for g in groups} == {0.01}


def test_absolute_floor_ends_every_group_at_min_lr(tiny_cfg):
    cfg = tiny_cfg("schedule.min_lr_mode=absolute", "schedule.min_lr=1e-6", "schedule.warmup_steps=0", phase2=True)
    model = build_model(cfg.model)
    model.set_mode("phase2")
    opt = build_optimizer(model, cfg)
    sched = build_scheduler(opt, cfg, total_steps=4)
    for _ in range(4):
        opt.step()
        sched.step()
    assert all(g["lr"] == pytest.approx(1e-6) for g in opt.param_groups)


def test_epoch_interval_equals_cosine_annealing_lr_stepped_once_per_epoch():
    import torch

    from mtlxray.config import load_config

    cfg = load_config(REPO / "configs" / "demo.yaml", ["schedule.interval=epoch", "schedule.min_lr_mode=absolute",
                                                       "schedule.min_lr=1e-6", "schedule.warmup_steps=0",
                                                       "optim.lr=1e-3"])
    epochs, per_epoch = 4, 3
    param = torch.nn.Parameter(torch.zeros(1))
    ours = torch.optim.SGD([param], lr=cfg.optim.lr)
    sched = build_scheduler(ours, cfg, total_steps=epochs * per_epoch, steps_per_epoch=per_epoch)
    ref = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=cfg.optim.lr)
    torch_sched = torch.optim.lr_scheduler.CosineAnnealingLR(ref, T_max=epochs, eta_min=1e-6)
    for epoch in range(epochs):
        for _ in range(per_epoch):
            assert ours.param_groups[0]["lr"] == pytest.approx(ref.param_groups[0]["lr"], rel=1e-12, abs=0), epoch
            ours.step()
            sched.step()
        ref.step()
        torch_sched.step()

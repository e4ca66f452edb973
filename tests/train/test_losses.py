import pytest
import torch
import torch.nn.functional as F

from mtlxray.train.losses import masked_seg_loss, multitask_loss, seg_loss_per_sample


def test_seg_loss_per_sample_is_half_bce_plus_soft_dice():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    p = torch.sigmoid(logits)
    bce = F.binary_cross_entropy_with_logits(logits[0], target[0])
    dice = 1 - (2 * (p[0] * target[0]).sum() + 1) / (p[0].sum() + target[0].sum() + 1)
    assert seg_loss_per_sample(logits, target)[0].item() == pytest.approx((0.5 * bce + dice).item(), rel=1e-6)


def test_seg_loss_per_sample_near_zero_for_confident_correct_prediction():
    target = torch.zeros(1, 1, 8, 8)
    target[..., 2:6, 2:6] = 1
    logits = (target * 2 - 1) * 30
    assert seg_loss_per_sample(logits, target).item() < 1e-3


def test_masked_seg_loss_with_no_included_sample_is_zero_with_zero_gradient():
    logits = torch.randn(3, 1, 8, 8, requires_grad=True)
    loss = masked_seg_loss(logits, torch.ones(3, 1, 8, 8), torch.zeros(3, dtype=torch.bool))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(logits.grad) == 0


def test_normal_only_batch_yields_zero_infection_loss_and_gradient():
    torch.manual_seed(0)
    inf_logits = torch.randn(4, 1, 8, 8, requires_grad=True)
    out = {"lung": torch.randn(4, 1, 8, 8), "inf": inf_logits, "cls": torch.randn(4, 3)}
    batch = {"lung": torch.ones(4, 1, 8, 8), "inf": torch.ones(4, 1, 8, 8),
             "label": torch.zeros(4, dtype=torch.long), "has_inf": torch.ones(4, dtype=torch.bool)}
    total, parts = multitask_loss(out, batch, {"lung": 1.0, "inf": 1.0, "cls": 0.3}, [2])
    assert parts["inf"].item() == 0.0
    total.backward()
    assert torch.count_nonzero(inf_logits.grad) == 0


def test_infection_loss_counts_only_covid_samples():
    torch.manual_seed(0)
    out = {"lung": torch.randn(2, 1, 8, 8), "inf": torch.randn(2, 1, 8, 8), "cls": torch.randn(2, 3)}
    batch = {"lung": torch.ones(2, 1, 8, 8), "inf": (torch.rand(2, 1, 8, 8) > 0.5).float(),
             "label": torch.tensor([2, 1]), "has_inf": torch.tensor([True, True])}
    _, parts = multitask_loss(out, batch, {"lung": 1.0, "inf": 1.0, "cls": 0.3}, [2])
    expected = seg_loss_per_sample(out["inf"][:1], batch["inf"][:1]).item()
    assert parts["inf"].item() == pytest.approx(expected, rel=1e-6)


def test_multitask_loss_weights_the_tasks():
    torch.manual_seed(0)
    out = {"lung": torch.randn(2, 1, 8, 8), "inf": None, "cls": torch.randn(2, 3)}
    batch = {"lung": torch.ones(2, 1, 8, 8), "inf": torch.zeros(2, 1, 8, 8),
             "label": torch.tensor([0, 1]), "has_inf": torch.tensor([False, False])}
    total, parts = multitask_loss(out, batch, {"lung": 1.0, "inf": 0.0, "cls": 0.5}, [2])
    assert set(parts) == {"lung", "cls"}
    assert total.item() == pytest.approx(parts["lung"].item() + 0.5 * F.cross_entropy(out["cls"], batch["label"]).item())


def test_nan_in_an_excluded_sample_reaches_neither_the_loss_nor_the_gradient():
    torch.manual_seed(0)
    logits = torch.randn(3, 1, 8, 8)
    logits[1] = float("nan")  # an excluded sample's head diverged
    logits.requires_grad_(True)
    include = torch.tensor([True, False, True])
    loss = masked_seg_loss(logits, (torch.rand(3, 1, 8, 8) > 0.5).float(), include)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(logits.grad).all()
    assert torch.count_nonzero(logits.grad[1]) == 0


def test_infection_loss_can_average_over_the_batch_instead_of_the_positives():
    torch.manual_seed(0)
    logits, target = torch.randn(4, 1, 8, 8), (torch.rand(4, 1, 8, 8) > 0.5).float()
    include = torch.tensor([True, False, False, True])
    over_pos = masked_seg_loss(logits, target, include)
    over_batch = masked_seg_loss(logits, target, include, mean_over="batch")
    assert over_batch.item() == pytest.approx(over_pos.item() * 2 / 4, rel=1e-6)


def test_bce_weight_scales_the_bce_term():
    torch.manual_seed(0)
    logits, target = torch.randn(2, 1, 8, 8), (torch.rand(2, 1, 8, 8) > 0.5).float()
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").flatten(1).mean(1)
    diff = seg_loss_per_sample(logits, target, bce_weight=1.0) - seg_loss_per_sample(logits, target, bce_weight=0.0)
    assert torch.allclose(diff, bce, rtol=1e-5)


def test_phase_seg_loss_picks_bce_alone_dice_alone_or_both_for_every_mask(tiny_cfg):
    from mtlxray.train.losses import phase_loss

    torch.manual_seed(0)
    out = {"lung": torch.randn(2, 1, 8, 8), "inf": torch.randn(2, 1, 8, 8), "cls": torch.randn(2, 3)}
    batch = {"lung": (torch.rand(2, 1, 8, 8) > 0.5).float(), "inf": (torch.rand(2, 1, 8, 8) > 0.7).float(),
             "label": torch.tensor([2, 2]), "has_inf": torch.ones(2, dtype=torch.bool)}
    expected = {}
    for task in ("lung", "inf"):
        bce = F.binary_cross_entropy_with_logits(out[task], batch[task])
        p, t = torch.sigmoid(out[task]).flatten(1), batch[task].flatten(1)
        dice = (1 - (2 * (p * t).sum(1) + 1) / (p.sum(1) + t.sum(1) + 1)).mean()
        expected[task] = {"bce": bce, "dice": dice, "bce_dice": 0.5 * bce + dice}
    for kind in ("bce", "dice", "bce_dice"):
        cfg = tiny_cfg(f"phase.seg_loss={kind}", "phase.loss_weights={lung: 1.0, inf: 1.0, cls: 0.5}", phase2=True)
        _, parts = phase_loss(out, batch, cfg.phase)
        for task in ("lung", "inf"):
            assert parts[task].item() == pytest.approx(expected[task][kind].item(), rel=1e-6), (kind, task)

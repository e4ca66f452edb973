"""The detection heads (`model.det_head`): on every model with an encoder, a loss that trains them on the
synthetic set, and exact zeros for the samples it must not learn from."""

import pytest
import torch

from mtlxray.config import ModelConfig
from mtlxray.errors import ConfigError
from mtlxray.model import build_model
from mtlxray.model.detection import box_scores, det_candidates, detection_loss, postprocess

from _model_support import tiny_config

SWIN = dict(img_size=64, embed_dim=12, depths=[1, 1], num_heads=[1, 2], window_size=4, ppm_channels=16,
            ppm_bins=[1, 2], decoder_channels=[16, 8], cross_attn_heads=[1, 1], head_channels=8, cls_channels=8,
            drop_path_rate=0.0)
SMP = dict(name="unet", encoder="tu-resnet10t", img_size=64, lib_kwargs={"decoder_channels": [16, 16, 8, 8, 8]})


@pytest.fixture(scope="module")
def tiny_shards(tmp_path_factory):
    from tiny_data import make_tiny_shards

    return make_tiny_shards(tmp_path_factory.mktemp("det-shards"), format="raw", image_size=64)


@pytest.mark.parametrize("kind", ["fcos", "kbox"])
@pytest.mark.parametrize("features", ["encoder", "decoder"])
@pytest.mark.parametrize("base", [SWIN, SMP], ids=["mtl_swin_unet", "smp_unet"])
def test_every_model_with_an_encoder_takes_either_head_on_encoder_or_decoder_features(kind, features, base):
    cfg = ModelConfig(**base, det_head=kind, det_features=features, det_stride=8, det_max_boxes=5)
    model = build_model(cfg, pretrained=False)
    assert "det" in model.tasks and model.det_head is not None
    out = model(torch.rand(2, 1, 64, 64))
    n = 8 * 8 if kind == "fcos" else 5
    assert out["det"].shape == (2, n, 6)
    assert (out["det_points"] is None) == (kind == "kbox")
    boxes = out["det"][..., :4]
    if kind == "fcos":
        assert (boxes[..., 2] > boxes[..., 0]).all() and (boxes[..., 3] > boxes[..., 1]).all()
    else:  # ReLU sides: a box of zero width or height is an empty slot
        assert (boxes[..., 2] >= boxes[..., 0]).all() and (boxes[..., 3] >= boxes[..., 1]).all()


def test_a_model_without_a_head_reports_det_none_and_a_classifier_refuses_one():
    out = build_model(ModelConfig(**SWIN), pretrained=False).eval()(torch.rand(1, 1, 64, 64))
    assert "det" not in out and out.get("det") is None  # the output dict of a model without a head is as before
    with pytest.raises(ConfigError, match="no spatial features"):
        build_model(ModelConfig(name="swin_t_cls", img_size=64, det_head="fcos",
                                lib_kwargs={"embed_dim": 24, "depths": [1, 1, 2, 1], "num_heads": [1, 2, 2, 4],
                                            "window_size": 4}), pretrained=False)


def test_det_stride_must_match_an_encoder_map():
    with pytest.raises(ConfigError, match="det_stride=2"):
        build_model(ModelConfig(**SWIN, det_head="fcos", det_stride=2), pretrained=False)


def _synthetic_batch(tiny_shards, n: int = 4) -> dict:
    """The first n COVID-19 images of the tiny set's infection training split, with their boxes."""
    from mtlxray.config import DataConfig
    from mtlxray.data.loader import batch_to_device, build_eval_loader

    loader = build_eval_loader(DataConfig(shards=str(tiny_shards), workers=0), subset="infection", split="train",
                               rank=0, world_size=1, batch_size=16)
    batch = batch_to_device(next(iter(loader)), "cpu")
    keep = [i for i, b in enumerate(batch["boxes"]) if b][:n]
    return {"img": batch["img"][keep], "boxes": [batch["boxes"][i] for i in keep]}


@pytest.mark.parametrize("kind", ["fcos", "kbox"])
def test_the_detection_loss_decreases_on_the_synthetic_set(tiny_shards, kind):
    torch.manual_seed(0)
    batch = _synthetic_batch(tiny_shards)
    assert batch["boxes"] and all(batch["boxes"])
    model = build_model(ModelConfig(**SWIN, det_head=kind, det_max_boxes=6), pretrained=False)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    include = torch.ones(len(batch["boxes"]), dtype=torch.bool)
    losses = []
    for _ in range(12):
        out = model(batch["img"])
        loss = detection_loss(out["det"], out["det_points"], batch["boxes"], include, (64, 64))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0], losses


@pytest.mark.parametrize("kind", ["fcos", "kbox"])
def test_excluded_samples_contribute_an_exact_zero_and_no_gradient(kind):
    model = build_model(ModelConfig(**SWIN, det_head=kind), pretrained=False)
    x = torch.rand(3, 1, 64, 64)
    boxes = [[[4, 4, 20, 30]], [], [[30, 10, 60, 40], [5, 40, 12, 50]]]
    out = model(x)
    nothing = detection_loss(out["det"], out["det_points"], boxes, torch.zeros(3, dtype=torch.bool), (64, 64))
    nothing.backward()
    assert nothing.item() == 0.0
    assert all(p.grad is None or not p.grad.any() for p in model.det_head.parameters())
    # A sample that is left out changes nothing, whatever its boxes say.
    model.zero_grad()
    out = model(x)
    some = detection_loss(out["det"], out["det_points"], boxes, torch.tensor([True, False, True]), (64, 64))
    other = detection_loss(out["det"], out["det_points"], [boxes[0], [[1, 1, 63, 63]], boxes[2]],
                           torch.tensor([True, False, True]), (64, 64))
    assert some.item() == other.item() > 0


def test_candidates_and_nms_keep_the_best_box_of_overlapping_ones():
    det = torch.zeros(1, 3, 6)
    det[0, :, :4] = torch.tensor([[10, 10, 30, 30], [11, 11, 31, 31], [40, 40, 50, 60]], dtype=torch.float32)
    det[0, :, 4] = torch.tensor([3.0, 1.0, 2.0])
    det[0, :, 5] = det[0, :, 4]
    scores = box_scores(det)
    assert torch.allclose(scores, torch.sigmoid(det[..., 4]))  # kbox-style: quality = objectness
    kept = postprocess(det_candidates(det, (64, 64))[0], nms_iou=0.5, max_boxes=10)
    assert kept[:, :4].tolist() == [[10, 10, 30, 30], [40, 40, 50, 60]]


def test_the_swin_unet_tiny_config_takes_a_head_at_its_stride_4_map():
    cfg = tiny_config(det_head="fcos", det_stride=4)
    out = build_model(cfg, pretrained=False).eval()(torch.rand(1, 1, 32, 32))
    assert out["det"].shape == (1, 64, 6) and out["det_points"][:, 2].eq(4).all()


def test_giou_loss_equals_torchvisions_without_its_host_sync():
    from torchvision.ops import generalized_box_iou_loss

    from mtlxray.model.detection import giou_loss

    g = torch.Generator().manual_seed(0)
    a = torch.rand(200, 2, generator=g) * 50
    b = torch.rand(200, 2, generator=g) * 50
    pred = torch.cat([a, a + torch.rand(200, 2, generator=g) * 30 + 0.5], 1).requires_grad_()
    target = torch.cat([b, b + torch.rand(200, 2, generator=g) * 30 + 0.5], 1)
    ours, theirs = giou_loss(pred, target), generalized_box_iou_loss(pred, target, reduction="none")
    assert torch.allclose(ours, theirs, atol=1e-6)
    (g1,) = torch.autograd.grad(ours.sum(), pred)
    (g2,) = torch.autograd.grad(theirs.sum(), pred)
    assert torch.allclose(g1, g2, atol=1e-6)


def test_kbox_outputs_pass_a_relu_and_give_a_confidence_only_when_asked():
    from mtlxray.model.detection import KBoxHead

    torch.manual_seed(0)
    feat, size = torch.randn(3, 8, 8, 8), (64, 48)
    for confidence in (False, True):
        head = KBoxHead(8, 16, 5, "encoder", 8, confidence=confidence)
        raw = head.mlp(head.pool(feat).flatten(1)).view(3, 5, head.per_box)
        assert (raw[..., :4] < 0).any()  # the ReLU has something to clip
        det = head(feat, size)["det"]
        c = raw[..., :4].clamp_min(0)  # cx, cy, w, h
        h, w = size
        expected = torch.stack([(c[..., 0] - c[..., 2] / 2) * w, (c[..., 1] - c[..., 3] / 2) * h,
                                (c[..., 0] + c[..., 2] / 2) * w, (c[..., 1] + c[..., 3] / 2) * h], dim=-1)
        assert torch.allclose(det[..., :4], expected, atol=1e-6)
        conf = raw[..., 4] if confidence else torch.zeros(3, 5)
        assert torch.equal(det[..., 4], conf) and torch.equal(det[..., 5], conf)
        assert sum(p.numel() for p in head.mlp[2].parameters()) == 17 * 5 * head.per_box


def test_kbox_matching_is_the_assignment_of_greatest_total_iou():
    import itertools

    from torchvision.ops import box_iou

    from mtlxray.model.detection import match_by_overlap

    g = torch.Generator().manual_seed(1)

    def boxes(n):
        xy = torch.rand(n, 2, generator=g) * 40
        return torch.cat([xy, xy + 8 + torch.rand(n, 2, generator=g) * 20], dim=1)

    for k, n in [(4, 4), (5, 3), (3, 5)] * 4:
        pred, gt = boxes(k), boxes(n)
        iou = box_iou(pred, gt)
        slots, idx = match_by_overlap(pred, gt)
        assert len(slots) == min(k, n) and len(set(slots)) == len(slots) and len(set(idx)) == len(idx)
        # brute force: every injective map of the smaller set into the larger
        if k >= n:
            best = max(sum(iou[s, j].item() for j, s in enumerate(p)) for p in itertools.permutations(range(k), n))
        else:
            best = max(sum(iou[i, s].item() for i, s in enumerate(p)) for p in itertools.permutations(range(n), k))
        assert sum(iou[s, j].item() for s, j in zip(slots, idx)) == pytest.approx(best, abs=1e-9)


def test_kbox_loss_is_the_l2_to_matched_boxes_and_to_zero_for_empty_slots_by_hand():
    size = (64, 64)
    # two slots, one sample: slot 0 overlaps the second box, slot 1 the first; a third slot is empty
    det = torch.zeros(1, 3, 6)
    det[0, :, :4] = torch.tensor([[30.0, 30.0, 50.0, 50.0], [2.0, 2.0, 18.0, 20.0], [10.0, 40.0, 14.0, 44.0]])
    gt = [[[0.0, 0.0, 16.0, 16.0], [32.0, 32.0, 48.0, 52.0]]]

    def frac(b):  # xyxy pixels -> cx, cy, w, h fractions
        x0, y0, x1, y1 = (v / 64 for v in b)
        return [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]

    pairs = [(det[0, 0, :4].tolist(), frac(gt[0][1])), (det[0, 1, :4].tolist(), frac(gt[0][0])),
             (det[0, 2, :4].tolist(), [0.0, 0.0, 0.0, 0.0])]
    by_hand = sum(sum((a - b) ** 2 for a, b in zip(frac(p), t)) for p, t in pairs) / 3
    got = detection_loss(det, None, gt, torch.tensor([True]), size)
    assert got.item() == pytest.approx(by_hand, rel=1e-6)
    # with confidences: BCE against matched (1, 1) and empty (0), over the same three slots
    det[0, :, 4] = det[0, :, 5] = torch.tensor([0.3, -1.0, 2.0])
    bce = torch.nn.functional.binary_cross_entropy_with_logits(det[0, :, 4], torch.tensor([1.0, 1.0, 0.0]))
    with_conf = detection_loss(det, None, gt, torch.tensor([True]), size, kbox_confidence=True)
    assert with_conf.item() == pytest.approx(by_hand + bce.item(), rel=1e-6)

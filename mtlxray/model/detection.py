"""Infection-box detection heads (`model.det_head`), their loss, and the boxes they report.

Two heads read one feature map of the model (`model.det_features`: the encoder's map at stride
`model.det_stride`, or the decoder's last features average-pooled to that stride):

- `fcos` (`FCOSHead`), anchor-free in the FCOS family: at every location of the map, an
  objectness logit, a centre-ness logit and the distances from the location to the four sides of
  the box. Chosen for infection opacities because they are small, many per image and irregular:
  a dense head needs no anchor sizes or aspect ratios tuned to them, every location inside (or,
  for a box smaller than a cell, nearest to the centre of) an opacity is a positive, and a box
  is as tight as the distances say. Loss: sigmoid focal loss on the objectness over all
  locations (torchvision's `sigmoid_focal_loss`), GIoU loss on the decoded boxes (`giou_loss`)
  and BCE on the centre-ness at the positives.
- `kbox` (`KBoxHead`), MultiCheXNet's regression of K boxes from pooled features: K slots of
  (cx, cy, w, h) as fractions of the image, through a ReLU (a slot at w = h = 0 holds no box, and
  postprocessing drops it). Each included sample's ground-truth boxes are matched to the slots by
  overlap (`match_by_overlap`: the assignment of greatest total IoU, scipy's
  `linear_sum_assignment`); the loss is the squared L2 distance of every slot to its matched box,
  or to zero for a slot without one. Optionally (`model.det_kbox_confidence`) a confidence logit
  per slot with BCE against matched / unmatched, which then scores the boxes; without it every
  box scores 0.5. It cannot place more than K boxes; FCOS stays the default for that reason.

Both add `{"det": B×N×6, "det_points": N×3 or None}` to the model's output dict (a model without a
head adds nothing: `out.get("det")` is None): per prediction the box x0, y0, x1, y1
in input pixels (decoded, differentiable), an objectness logit and a quality logit (FCOS's
centre-ness; for `kbox` the confidence again, or 0 without one), so that every consumer scores a box the same way:
`box_scores` = sqrt(sigmoid(obj) · sigmoid(quality)). `det_points` holds FCOS's location
(x, y, stride) per prediction, which the loss needs to assign targets; None marks `kbox`.

FCOS's loss reads no device value back on the host: targets are built from the batch's box lists
(host data) and copied to the device; excluded samples are selected away with `torch.where`, so a
step costs no synchronisation. `kbox`'s matching reads its B×K predicted boxes back once per step
(an assignment problem is solved on the host, as DETR's matcher does). NMS (`postprocess`) runs
where evaluation already works on the host.
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from mtlxray.errors import ConfigError

__all__ = ["FCOSHead", "KBoxHead", "attach_det_head", "detect", "detection_loss", "giou_loss", "box_targets",
           "match_by_overlap", "box_scores", "det_candidates", "postprocess", "CANDIDATES"]

CANDIDATES = 100
"""Highest-scored predictions per image kept for NMS at evaluation (COCO's 100 detections)."""
_PRIOR = 0.01
"""Initial objectness probability (focal-loss initialisation: few locations hold a box)."""
_CENTRE_RADIUS = 1.5
"""FCOS centre sampling: a location is a positive if it lies in the box and within this many
strides of the box centre."""


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(math.gcd(32, channels), channels)


class FCOSHead(nn.Module):
    """Anchor-free dense head on one map (see the module docstring). Input B×C×h×w features."""

    def __init__(self, in_chs: int, channels: int, features: str, stride: int) -> None:
        super().__init__()
        self.features, self.stride = features, stride
        self.tower = nn.Sequential(
            nn.Conv2d(in_chs, channels, 3, padding=1, bias=False), _norm(channels), nn.ReLU(inplace=True),
            nn.Conv2d(channels, channels, 3, padding=1, bias=False), _norm(channels), nn.ReLU(inplace=True),
        )
        self.obj = nn.Conv2d(channels, 1, 3, padding=1)
        self.ctr = nn.Conv2d(channels, 1, 3, padding=1)
        self.box = nn.Conv2d(channels, 4, 3, padding=1)
        for conv in (self.obj, self.ctr, self.box):
            nn.init.normal_(conv.weight, std=0.01)
            nn.init.zeros_(conv.bias)
        nn.init.constant_(self.obj.bias, -math.log((1 - _PRIOR) / _PRIOR))

    def forward(self, feat: Tensor, size: tuple[int, int]) -> dict[str, Optional[Tensor]]:
        b, _, h, w = feat.shape
        sy, sx = size[0] / h, size[1] / w
        t = self.tower(feat)
        obj = self.obj(t).float().flatten(1)  # B, h*w
        ctr = self.ctr(t).float().flatten(1)  # B, h*w
        dist = torch.exp(self.box(t).float().clamp(max=8.0)).flatten(2).transpose(1, 2)  # B, h*w, 4 (strides)
        ys = (torch.arange(h, device=feat.device, dtype=torch.float32) + 0.5) * sy
        xs = (torch.arange(w, device=feat.device, dtype=torch.float32) + 0.5) * sx
        py, px = torch.meshgrid(ys, xs, indexing="ij")  # h, w each
        px, py = px.reshape(-1), py.reshape(-1)  # h*w
        scale = torch.tensor([sx, sy, sx, sy], device=feat.device)
        d = dist * scale  # B, h*w, 4: left, top, right, bottom in pixels
        boxes = torch.stack([px - d[..., 0], py - d[..., 1], px + d[..., 2], py + d[..., 3]], dim=-1)  # B, h*w, 4
        points = torch.stack([px, py, torch.full_like(px, (sx + sy) / 2)], dim=1)  # h*w, 3
        return {"det": torch.cat([boxes, obj[..., None], ctr[..., None]], dim=-1), "det_points": points}


class KBoxHead(nn.Module):
    """K boxes regressed from a 4×4 pooling of one map (MultiCheXNet's L2 box regression): ReLU
    outputs (cx, cy, w, h) as fractions of the image, and with `confidence` a logit per box."""

    GRID = 4

    def __init__(self, in_chs: int, channels: int, k: int, features: str, stride: int,
                 confidence: bool = False) -> None:
        super().__init__()
        self.features, self.stride, self.k, self.confidence = features, stride, k, confidence
        self.per_box = 5 if confidence else 4
        self.pool = nn.AdaptiveAvgPool2d(self.GRID)
        self.mlp = nn.Sequential(nn.Linear(in_chs * self.GRID ** 2, channels), nn.ReLU(inplace=True),
                                 nn.Linear(channels, k * self.per_box))
        nn.init.zeros_(self.mlp[2].bias)
        if confidence:
            with torch.no_grad():
                self.mlp[2].bias.view(k, 5)[:, 4] = -math.log((1 - _PRIOR) / _PRIOR)

    def forward(self, feat: Tensor, size: tuple[int, int]) -> dict[str, Optional[Tensor]]:
        z = self.mlp(self.pool(feat).flatten(1)).float().view(feat.shape[0], self.k, self.per_box)  # B, K, 4|5
        c = F.relu(z[..., :4])  # B, K, 4: cx, cy, w, h as fractions of the image
        h, w = size
        boxes = torch.stack([(c[..., 0] - c[..., 2] / 2) * w, (c[..., 1] - c[..., 3] / 2) * h,
                             (c[..., 0] + c[..., 2] / 2) * w, (c[..., 1] + c[..., 3] / 2) * h], dim=-1)  # B, K, 4
        conf = z[..., 4:5] if self.confidence else torch.zeros_like(z[..., :1])  # B, K, 1
        return {"det": torch.cat([boxes, conf, conf], dim=-1), "det_points": None}


class _Probed(Exception):
    def __init__(self, channels: int) -> None:
        super().__init__(channels)
        self.channels = channels


class _Probe(nn.Module):
    """Stands in for the head once, at build time, to learn the width of the features it will read."""

    def __init__(self, features: str, stride: int) -> None:
        super().__init__()
        self.features, self.stride = features, stride

    def forward(self, feat: Tensor, size: tuple[int, int]) -> dict:
        raise _Probed(int(feat.shape[1]))


def select_features(enc_feats: Sequence[Tensor], dec_feat: Optional[Tensor], size: tuple[int, int],
                    features: str, stride: int) -> Tensor:
    """The map a head reads: the encoder's map of `stride` (its side = input side // stride), or the
    decoder's features average-pooled to that side. Shapes only: no device read."""
    target = (max(1, size[0] // stride), max(1, size[1] // stride))
    if features == "decoder":
        if dec_feat is None:
            raise ConfigError("model.det_features=decoder: this model has no decoder features")
        return dec_feat if tuple(dec_feat.shape[-2:]) == target else F.adaptive_avg_pool2d(dec_feat, target)
    for f in enc_feats:
        if f.dim() == 4 and tuple(f.shape[-2:]) == target:
            return f
    have = sorted({size[0] // f.shape[-2] for f in enc_feats if f.dim() == 4 and f.shape[-2]})
    raise ConfigError(f"model.det_stride={stride}: the encoder has maps at strides {have}")


def detect(head: Optional[nn.Module], enc_feats: Sequence[Tensor], dec_feat: Optional[Tensor],
           size: tuple[int, int]) -> dict[str, Optional[Tensor]]:
    """The detection outputs of a model's forward pass, `det` and `det_points`; none without a head
    (so `out.get("det")` is None, and the output dict of a model without a head is unchanged)."""
    if head is None:
        return {}
    return head(select_features(enc_feats, dec_feat, size, head.features, head.stride), size)


def attach_det_head(model: nn.Module, cfg) -> nn.Module:
    """Give `model` the head `cfg.det_head` (a `ModelConfig`) as `model.det_head`, and `det` in its tasks.

    The feature width is learnt by one probing forward pass in eval mode on a blank image, stopped
    where the head would run. ConfigError for a model whose forward pass has no place for a head."""
    model.det_head = _Probe(cfg.det_features, cfg.det_stride)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, cfg.in_chans, cfg.img_size, cfg.img_size))
    except _Probed as probed:
        channels = probed.channels
    else:
        model.det_head = None
        raise ConfigError(f"model.det_head: {cfg.name} has no spatial features for a detection head "
                          "(the Swin-UNet and the smp segmentation baselines have)")
    finally:
        model.train(was_training)
    if cfg.det_head == "fcos":
        head = FCOSHead(channels, cfg.det_channels, cfg.det_features, cfg.det_stride)
    elif cfg.det_head == "kbox":
        head = KBoxHead(channels, cfg.det_channels, cfg.det_max_boxes, cfg.det_features, cfg.det_stride,
                        confidence=cfg.det_kbox_confidence)
    else:
        raise ConfigError(f"model.det_head: unknown head {cfg.det_head!r} (none, fcos or kbox)")
    model.det_head = head
    model.tasks = frozenset(model.tasks | {"det"})
    return head


# -------------------------------------------------------------------------------------------------
# targets and loss


def box_targets(boxes: Sequence[Sequence[Sequence[float]]], device: torch.device | str) -> tuple[Tensor, Tensor]:
    """Per-sample box lists (x0, y0, x1, y1; host data) -> (B×G×4 float32, B×G bool valid) on
    `device`, G >= 1."""
    rows = [list(map(list, b)) for b in boxes]
    g = max(1, max((len(r) for r in rows), default=0))
    data = [[[float(v) for v in box] for box in r] + [[0.0, 0.0, 1.0, 1.0]] * (g - len(r)) for r in rows]
    valid = [[True] * len(r) + [False] * (g - len(r)) for r in rows]
    return (torch.tensor(data, dtype=torch.float32, device=device).view(len(rows), g, 4),
            torch.tensor(valid, dtype=torch.bool, device=device).view(len(rows), g))


def giou_loss(pred: Tensor, target: Tensor, eps: float = 1e-7) -> Tensor:
    """1 - generalised IoU of matched box pairs (…×4 xyxy each), elementwise.

    The maths of `torchvision.ops.generalized_box_iou_loss` (tested equal), with the intersection
    clamped at zero instead of filled through a boolean mask: torchvision's masked assignment
    makes the host wait for the device on every call, which a training step must not."""
    x1, y1, x2, y2 = pred.unbind(-1)
    x1g, y1g, x2g, y2g = target.unbind(-1)
    inter = (torch.minimum(x2, x2g) - torch.maximum(x1, x1g)).clamp_min(0) * \
        (torch.minimum(y2, y2g) - torch.maximum(y1, y1g)).clamp_min(0)
    union = (x2 - x1) * (y2 - y1) + (x2g - x1g) * (y2g - y1g) - inter
    hull = (torch.maximum(x2, x2g) - torch.minimum(x1, x1g)) * (torch.maximum(y2, y2g) - torch.minimum(y1, y1g))
    return 1 - (inter / (union + eps) - (hull - union) / (hull + eps))


def _fcos_loss(det: Tensor, points: Tensor, gt: Tensor, valid: Tensor, include: Tensor) -> Tensor:
    from torchvision.ops import sigmoid_focal_loss

    pred, obj, ctr = det[..., :4], det[..., 4], det[..., 5]  # B×N×4, B×N, B×N
    px, py, stride = points[:, 0], points[:, 1], points[:, 2]  # N each
    x0, y0, x1, y1 = (gt[..., i][:, None, :] for i in range(4))  # B×1×G each
    l, t = px[None, :, None] - x0, py[None, :, None] - y0  # B×N×G
    r, b = x1 - px[None, :, None], y1 - py[None, :, None]
    inside = torch.minimum(torch.minimum(l, t), torch.minimum(r, b)) > 0
    cx, cy = (x0 + x1) / 2, (y0 + y1) / 2  # B×1×G
    radius = _CENTRE_RADIUS * stride[None, :, None]
    central = ((px[None, :, None] - cx).abs() < radius) & ((py[None, :, None] - cy).abs() < radius)
    # A box smaller than a cell may hold no location: its nearest location is its positive.
    d2 = (px[None, :, None] - cx) ** 2 + (py[None, :, None] - cy) ** 2  # B×N×G
    nearest = F.one_hot(d2.argmin(dim=1), d2.shape[1]).transpose(1, 2).bool()  # B×N×G
    cand = ((inside & central) | nearest) & valid[:, None, :] & include[:, None, None]
    area = ((x1 - x0) * (y1 - y0)).expand_as(d2)  # B×N×G
    area = torch.where(cand, area, torch.full_like(area, math.inf))
    match = area.argmin(dim=2)  # B×N: the smallest box claiming a location
    pos = cand.any(dim=2)  # B×N
    target = torch.gather(gt, 1, match[..., None].expand(-1, -1, 4))  # B×N×4
    n_pos = pos.sum().float().clamp_min(1.0)
    keep = include[:, None].expand_as(obj)  # B×N
    focal = sigmoid_focal_loss(torch.where(keep, obj, 0.0), pos.float(), reduction="none")  # B×N
    obj_loss = torch.where(keep, focal, 0.0).sum() / n_pos
    safe_target = torch.where(pos[..., None], target, pred.detach())  # no degenerate pair off the positives
    giou = giou_loss(pred.reshape(-1, 4), safe_target.reshape(-1, 4))
    box_loss = torch.where(pos.reshape(-1), giou, 0.0).sum() / n_pos
    lt = torch.stack([px[None] - target[..., 0], py[None] - target[..., 1],
                      target[..., 2] - px[None], target[..., 3] - py[None]], dim=-1).clamp_min(0.5)  # B×N×4
    centreness = torch.sqrt((torch.minimum(lt[..., 0], lt[..., 2]) / torch.maximum(lt[..., 0], lt[..., 2]))
                            * (torch.minimum(lt[..., 1], lt[..., 3]) / torch.maximum(lt[..., 1], lt[..., 3])))
    ctr_bce = F.binary_cross_entropy_with_logits(torch.where(pos, ctr, 0.0), centreness, reduction="none")
    ctr_loss = torch.where(pos, ctr_bce, 0.0).sum() / n_pos
    return obj_loss + box_loss + ctr_loss


def match_by_overlap(pred: Tensor, gt: Tensor) -> tuple[list[int], list[int]]:
    """Slots of K predicted boxes matched to G ground-truth boxes (xyxy each, on the host): the
    one-to-one assignment of min(K, G) pairs with the greatest total IoU (scipy's
    `linear_sum_assignment`, the Hungarian method). Returns (slot indices, box indices)."""
    from scipy.optimize import linear_sum_assignment
    from torchvision.ops import box_iou

    if not len(gt) or not len(pred):
        return [], []
    rows, cols = linear_sum_assignment(box_iou(pred.double(), gt.double()).numpy(), maximize=True)
    return rows.tolist(), cols.tolist()


def _cxcywh(x: Tensor, size: tuple[int, int]) -> Tensor:
    """…×4 xyxy in pixels -> …×4 (cx, cy, w, h) as fractions of the image."""
    h, w = size
    x = x / x.new_tensor([w, h, w, h])
    return torch.stack([(x[..., 0] + x[..., 2]) / 2, (x[..., 1] + x[..., 3]) / 2,
                        x[..., 2] - x[..., 0], x[..., 3] - x[..., 1]], dim=-1)


def _kbox_loss(det: Tensor, boxes: Sequence, include: Tensor, size: tuple[int, int], confidence: bool) -> Tensor:
    b, k = det.shape[:2]
    pred = det[..., :4]  # B×K×4 xyxy pixels
    # The assignment needs the predicted boxes on the host: the one device read of a kbox step.
    keep_rows = include.tolist()
    host = pred.detach().float().cpu()
    target = torch.zeros(b, k, 4)  # (cx, cy, w, h) fractions; 0 for a slot without a box
    matched = torch.zeros(b, k, dtype=torch.bool)
    for i in range(b):
        if not keep_rows[i] or not boxes[i]:
            continue
        gt = torch.tensor([[float(v) for v in box] for box in boxes[i]], dtype=torch.float32)  # G×4
        slots, idx = match_by_overlap(host[i], gt)
        target[i, slots] = _cxcywh(gt[idx], size)
        matched[i, slots] = True
    target, matched = target.to(det.device), matched.to(det.device)
    keep = include[:, None].expand(b, k)  # B×K
    l2 = ((_cxcywh(torch.where(keep[..., None], pred, 0.0), size) - target) ** 2).sum(-1)  # B×K
    n = (include.sum().float() * k).clamp_min(1.0)
    loss = torch.where(keep, l2, 0.0).sum() / n
    if confidence:
        bce = F.binary_cross_entropy_with_logits(torch.where(keep, det[..., 4], 0.0), matched.float(),
                                                 reduction="none")
        loss = loss + torch.where(keep, bce, 0.0).sum() / n
    return loss


def detection_loss(det: Tensor, points: Optional[Tensor], boxes: Sequence, include: Tensor,
                   size: tuple[int, int], *, kbox_confidence: bool = False) -> Tensor:
    """The detection loss of a batch: `det`, `det_points` from the model, `boxes` the batch's
    per-sample box lists, `include` (B bool) the samples whose boxes train the head (see
    `mtlxray.train.teacher_forcing`), `kbox_confidence` whether a `kbox` head has confidences
    (`model.det_kbox_confidence`). An excluded sample contributes an exact zero, and with no
    sample included the loss is an exact 0 with an exactly zero gradient."""
    det = det.float()
    if points is not None:
        gt, valid = box_targets(boxes, det.device)
        return _fcos_loss(det, points.float(), gt, valid, include)
    return _kbox_loss(det, boxes, include, size, kbox_confidence)


# -------------------------------------------------------------------------------------------------
# boxes at inference


def box_scores(det: Tensor) -> Tensor:
    """B×N scores in [0, 1] of a `det` output: sqrt(sigmoid(obj) · sigmoid(quality))."""
    det = det.float()
    return torch.sqrt(torch.sigmoid(det[..., 4]) * torch.sigmoid(det[..., 5]))


@torch.no_grad()
def det_candidates(det: Tensor, size: tuple[int, int], k: int = CANDIDATES) -> Tensor:
    """The k best-scored predictions per image, clipped to the image: B×k×5 (x0, y0, x1, y1, score),
    on the device (no host read: evaluation runs NMS later, on the host)."""
    scores = box_scores(det)  # B×N
    k = min(k, scores.shape[1])
    top, idx = scores.topk(k, dim=1)  # B×k
    boxes = torch.gather(det[..., :4].float(), 1, idx[..., None].expand(-1, -1, 4))  # B×k×4
    h, w = size
    boxes = torch.stack([boxes[..., 0].clamp(0, w), boxes[..., 1].clamp(0, h), boxes[..., 2].clamp(0, w),
                         boxes[..., 3].clamp(0, h)], dim=-1)
    return torch.cat([boxes, top[..., None]], dim=-1)


def postprocess(cands: Tensor, nms_iou: float, max_boxes: int, min_score: float = 0.0) -> Tensor:
    """One image's candidates (k×5) -> the kept boxes M×5 after NMS, best first, at most
    `max_boxes`, each scoring at least `min_score` and of positive area."""
    from torchvision.ops import nms

    cands = cands.float()
    ok = (cands[:, 4] >= min_score) & (cands[:, 2] > cands[:, 0]) & (cands[:, 3] > cands[:, 1])
    cands = cands[ok]
    if not len(cands):
        return cands.reshape(0, 5)
    keep = nms(cands[:, :4], cands[:, 4], nms_iou)[:max_boxes]
    return cands[keep]

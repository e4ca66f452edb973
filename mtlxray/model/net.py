"""The multi-task Swin-UNet, the U-Net baselines, and `build_model` with its small registry.

All models share one output dict and submodule names (`encoder`, `ppm`, `lung_decoder`,
`inf_decoder`, `lung_head`, `inf_head`, `cls_head`), which freezing and learning-rate rules
refer to:

    out = model(x)           # x: B×1×H×W in [0, 1]
    out["lung"]              # B×1×H×W logits
    out["inf"]               # B×1×H×W logits in phase2, None in phase1
    out["cls"]               # B×num_classes logits
"""

from __future__ import annotations

import contextlib
import logging
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from mtlxray.config import ModelConfig
from mtlxray.errors import ConfigError
from mtlxray.model.checkpointing import CHECKPOINT_MODES, CheckpointMode
from mtlxray.model.decoder import PPM, ConvBNReLU, CrossAttention, DecoderBranch, UpConv
from mtlxray.model.base import MTLModel, Mode, check_mode
from mtlxray.model.heads import ClassHead, MaskHead
from mtlxray.model.swin import SwinEncoder

__all__ = ["MultiTaskUNet", "MTLSwinUNet", "UNetEncoder", "build_model", "MODELS"]

log = logging.getLogger(__name__)

# Fixed input normalisation of the [0, 1] radiograph (a mid-grey mean, a quarter-range spread).
_MEAN, _STD = 0.5, 0.25


class MultiTaskUNet(MTLModel):
    """Encoder -> bottleneck -> lung/infection decoders (optionally cross-attending) -> three heads.

    Phase 1 computes the lung and class outputs only. When the infection decoder's parameters
    do not require grad (phase 1 freezes them), it runs under no_grad and in eval mode, so its
    weights and BatchNorm statistics stay untouched while its features still feed the lung
    branch's cross-attention. `inf_decoder=None` gives a single shared decoder (plain U-Net).
    """

    def __init__(self, encoder: nn.Module, ppm: nn.Module, lung_decoder: DecoderBranch,
                 inf_decoder: Optional[DecoderBranch], num_classes: int, head_channels: int,
                 cls_channels: int, cls_use_bottleneck: bool, bottleneck_chs: int) -> None:
        super().__init__()
        self.encoder = encoder
        self.ppm = ppm
        self.lung_decoder = lung_decoder
        self.inf_decoder = inf_decoder
        out_chs = lung_decoder.out_chs
        self.lung_head = MaskHead(out_chs, head_channels)
        self.inf_head = MaskHead(out_chs, head_channels)
        self.cls_head = ClassHead(cls_channels, num_classes, bottleneck_chs if cls_use_bottleneck else 0)

    def set_grad_checkpointing(self, mode: CheckpointMode) -> None:
        """Activation checkpointing (see `mtlxray.model.checkpointing`): `attention` recomputes the
        encoder's window attention; `block` and `selective` recompute every encoder block and every
        decoder stage and cross-attention, whole or selectively."""
        if mode not in CHECKPOINT_MODES:
            raise ConfigError(f"model.grad_checkpoint must be one of {'|'.join(CHECKPOINT_MODES)}, got {mode!r}")
        if hasattr(self.encoder, "set_grad_checkpointing"):
            self.encoder.set_grad_checkpointing(mode)
        for m in self.modules():
            if isinstance(m, (UpConv, CrossAttention)):
                m.grad_checkpoint = mode

    def set_mode(self, mode: Mode) -> None:
        """Select phase1 (lung + class) or phase2 (all three outputs); call before wrapping for DDP."""
        super().set_mode(mode)
        self.cls_head.set_mode(mode)

    def _inf_frozen(self) -> bool:
        return self.inf_decoder is not None and not any(p.requires_grad for p in self.inf_decoder.parameters())

    @contextlib.contextmanager
    def _frozen_eval(self, frozen: bool) -> Iterator[None]:
        """Run the frozen infection decoder in eval mode (BN uses, not updates, its statistics)."""
        was_training = self.inf_decoder is not None and self.inf_decoder.training
        if frozen and was_training:
            self.inf_decoder.train(False)
        try:
            yield
        finally:
            if frozen and was_training:
                self.inf_decoder.train(True)

    def _decode(self, bottleneck: torch.Tensor, skips: Sequence[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Run both branches stage by stage; returns the last lung and infection features."""
        frozen = self._inf_frozen()
        lung_dec = self.lung_decoder
        inf_dec = self.inf_decoder if self.inf_decoder is not None else self.lung_decoder
        no_grad = torch.no_grad if frozen else contextlib.nullcontext

        def inf(fn: Callable[..., torch.Tensor], *args: Optional[torch.Tensor]) -> torch.Tensor:
            with no_grad():
                return fn(*args)

        lung = feat = bottleneck
        with self._frozen_eval(frozen):
            for i, stage in enumerate(lung_dec.stages):
                skip = skips[i] if i < len(skips) else None
                lung = stage(lung, skip)
                if self.inf_decoder is None:
                    feat = lung
                    continue
                feat = inf(inf_dec.stages[i], feat, skip)
                if lung_dec.cross is not None:
                    # Both directions read the features from before this exchange.
                    lung, feat = lung_dec.cross[i](lung, feat), inf(inf_dec.cross[i], feat, lung)
        return lung, feat

    def forward(self, x: torch.Tensor, mode: Optional[Mode] = None) -> dict[str, Optional[torch.Tensor]]:
        """x: (B, 1, H, W) in [0, 1] -> {"lung", "inf", "cls"} logits (inf is None in phase1)."""
        mode = check_mode(mode or self.mode)
        size = (x.shape[-2], x.shape[-1])
        feats = self.encoder((x - _MEAN) / _STD)  # NCHW maps, strides 4, 8, 16, 32
        bottleneck = self.ppm(feats[-1])  # B, C, H/32, W/32
        lung_feat, inf_feat = self._decode(bottleneck, feats[-2::-1])
        lung = self.lung_head(lung_feat, size)  # B, 1, H, W
        inf = self.inf_head(inf_feat, size) if mode == "phase2" else None
        masks = torch.sigmoid(lung) if inf is None else torch.sigmoid(torch.cat([lung, inf], dim=1))
        pooled = bottleneck.mean(dim=(2, 3)) if self.cls_head.bottleneck_chs else None
        return {"lung": lung, "inf": inf, "cls": self.cls_head(masks, pooled)}


class MTLSwinUNet(MultiTaskUNet):
    """The paper's model: Swin-T encoder, PPM, two cross-attending U-Net decoders, three heads."""

    def __init__(self, cfg: ModelConfig) -> None:
        encoder = SwinEncoder(
            img_size=cfg.img_size, in_chans=cfg.in_chans, patch_size=cfg.patch_size, embed_dim=cfg.embed_dim,
            depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads), window_size=cfg.window_size,
            mlp_ratio=cfg.mlp_ratio, drop_path_rate=cfg.drop_path_rate, attention=cfg.attention,
            grad_checkpoint=cfg.grad_checkpoint,
        )
        chs = [f["num_chs"] for f in encoder.feature_info]
        skips = chs[-2::-1]
        super().__init__(
            encoder=encoder,
            ppm=PPM(chs[-1], cfg.ppm_bins, cfg.ppm_channels),
            lung_decoder=DecoderBranch(chs[-1], skips, cfg.decoder_channels, cfg.cross_attn_heads),
            inf_decoder=DecoderBranch(chs[-1], skips, cfg.decoder_channels, cfg.cross_attn_heads),
            num_classes=cfg.num_classes, head_channels=cfg.head_channels, cls_channels=cfg.cls_channels,
            cls_use_bottleneck=cfg.cls_use_bottleneck, bottleneck_chs=chs[-1],
        )


class UNetEncoder(nn.Module):
    """Convolutional U-Net encoder with the Swin encoder's strides (4, 8, 16, 32) and widths.

    A stride-2 conv stem and a max-pool reach stride 4; each later stage max-pools then applies
    two 3×3 conv+BN+ReLU. Returns one NCHW map per stage.
    """

    def __init__(self, in_chans: int, widths: Sequence[int]) -> None:
        super().__init__()
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, widths[0], 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True), nn.MaxPool2d(2), ConvBNReLU(widths[0], widths[0]),
        )
        self.stages = nn.ModuleList([
            nn.Sequential(nn.MaxPool2d(2), ConvBNReLU(cin, cout), ConvBNReLU(cout, cout))
            for cin, cout in zip(widths[:-1], widths[1:])
        ])
        self.feature_info = [{"num_chs": w, "reduction": 4 * 2 ** i, "module": "stem" if i == 0 else f"stages.{i - 1}"}
                             for i, w in enumerate(widths)]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        feats = [self.stem(x)]  # B, w0, H/4, W/4
        for stage in self.stages:
            feats.append(stage(feats[-1]))
        return feats


def _unet(cfg: ModelConfig, two_decoders: bool) -> MultiTaskUNet:
    widths = [cfg.embed_dim * 2 ** i for i in range(len(cfg.depths))]
    skips = widths[-2::-1]
    return MultiTaskUNet(
        encoder=UNetEncoder(cfg.in_chans, widths), ppm=nn.Identity(),
        lung_decoder=DecoderBranch(widths[-1], skips, cfg.decoder_channels),
        inf_decoder=DecoderBranch(widths[-1], skips, cfg.decoder_channels) if two_decoders else None,
        num_classes=cfg.num_classes, head_channels=cfg.head_channels, cls_channels=cfg.cls_channels,
        cls_use_bottleneck=cfg.cls_use_bottleneck, bottleneck_chs=widths[-1],
    )


MODELS: dict[str, Callable[[ModelConfig], MultiTaskUNet]] = {
    "mtl_swin_unet": MTLSwinUNet,
    "unet": lambda cfg: _unet(cfg, two_decoders=False),
    "mtl_unet": lambda cfg: _unet(cfg, two_decoders=True),
}


def build_model(cfg: ModelConfig) -> MultiTaskUNet:
    """Build the model named by `cfg.name` (mtl_swin_unet, unet, mtl_unet) in phase1 mode."""
    if cfg.name not in MODELS:
        raise ConfigError(f"model.name: unknown model {cfg.name!r}; choose from {', '.join(MODELS)}")
    model = MODELS[cfg.name](cfg)
    model.set_grad_checkpointing(cfg.grad_checkpoint)
    if cfg.name == "mtl_swin_unet":
        log.info("window attention: %s (auto: explicit softmax on CPU, SDPA on GPU)",
                 cfg.attention)
    return model

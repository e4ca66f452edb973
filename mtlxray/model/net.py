"""The multi-task Swin-UNet, registered as `mtl_swin_unet` (`mtlxray.model.registry`).

The Swin-UNet's submodules (`encoder`, `ppm`, `lung_decoder`, `inf_decoder`, `lung_head`,
`inf_head`, `cls_head`) are what its freezing and learning-rate rules refer to. The baselines
(`mtlxray.model.zoo`, `mtlxray.model.clip`: smp, timm and open_clip models) return the same dict,
with None for the outputs they do not produce (their spec's `tasks`):

    out = model(x)           # x: B×1×H×W in [0, 1]
    out["lung"]              # B×1×H×W logits
    out["inf"]               # B×1×H×W logits in phase2, None in phase1
    out["cls"]               # B×num_classes logits
    out.get("det")           # B×N×6 infection boxes with model.det_head (mtlxray.model.detection), else None
"""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Optional, Sequence

import torch
import torch.nn as nn

from mtlxray.config import ModelConfig
from mtlxray.errors import ConfigError
from mtlxray.model.recompute import CHECKPOINT_MODES, CheckpointMode
from mtlxray.model.decoder import PPM, CrossAttention, DecoderBranch, UpConv
from mtlxray.model.detection import detect
from mtlxray.model.base import MTLModel, Mode, check_mode
from mtlxray.model.heads import ClassHead, MaskHead
from mtlxray.model.pretrained import load_timm_swin_encoder
from mtlxray.model.registry import register_model
from mtlxray.model.swin import SwinEncoder

__all__ = ["MultiTaskUNet", "MTLSwinUNet"]

# Initial foreground probability of the mask heads: lungs cover about a fifth of a chest X-ray,
# infection a few percent of it.
LUNG_PRIOR, INFECTION_PRIOR = 0.2, 0.02

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
        self.lung_head = MaskHead(out_chs, head_channels, prior=LUNG_PRIOR)
        self.inf_head = MaskHead(out_chs, head_channels, prior=INFECTION_PRIOR)
        self.cls_head = ClassHead(cls_channels, num_classes, bottleneck_chs if cls_use_bottleneck else 0)
        self.det_head: Optional[nn.Module] = None
        """Infection-box head (`model.det_head`, set by `mtlxray.model.detection.attach_det_head`)."""
        self.normalize_input = True
        """Standardise the [0, 1] image with a fixed mean and spread before the encoder (model.input_norm)."""

    def set_grad_checkpointing(self, mode: CheckpointMode) -> None:
        """Activation checkpointing (see `mtlxray.model.recompute`): `attention` recomputes the
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

    def classifier_names(self) -> list[str]:
        """Module names of the class head's last layer (re-initialised on a class-count change)."""
        return ["cls_head.fc"]

    def init_phase2_class_input(self) -> None:
        """Start the class head's phase-2 input conv from its phase-1 conv (lung channel copied,
        infection channel zero): `phase.cls_phase2_init: from_phase1`."""
        self.cls_head.init_phase2_from_phase1()

    def encoder_block_prefixes(self, n: int) -> list[str]:
        """Prefixes of the patch embedding and the first `n` encoder blocks, counted across stages
        (a stage's patch merging goes with its first block); n=0 gives []."""
        stages = getattr(self.encoder, "stages", None)
        if stages is None or not hasattr(self.encoder, "patch_embed"):
            raise ConfigError(f"{type(self.encoder).__name__} has no Swin blocks to count")
        blocks = [(i, j) for i, stage in enumerate(stages) for j in range(len(stage.blocks))]
        if not 0 <= n <= len(blocks):
            raise ConfigError(f"the encoder has {len(blocks)} blocks; cannot freeze the first {n}")
        out = ["encoder.patch_embed"] if n else []
        for i, j in blocks[:n]:
            if j == 0 and any(True for _ in stages[i].downsample.parameters()):
                out.append(f"encoder.stages.{i}.downsample")
            out.append(f"encoder.stages.{i}.blocks.{j}")
        return out

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 1, H, W) in [0, 1] -> the encoder's NCHW maps (strides 4, 8, 16, 32; the last normed)."""
        return self.encoder((x - _MEAN) / _STD if self.normalize_input else x)

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
        feats = self.encode(x)  # NCHW maps, strides 4, 8, 16, 32
        on_encoder = self.det_head is not None and self.det_head.features == "encoder"
        det = detect(self.det_head, feats, None, size) if on_encoder else None  # model.det_head
        bottleneck = self.ppm(feats[-1])  # B, C, H/32, W/32
        lung_feat, inf_feat = self._decode(bottleneck, feats[-2::-1])
        if not on_encoder:
            det = detect(self.det_head, feats, inf_feat, size)
        lung = self.lung_head(lung_feat, size)  # B, 1, H, W
        inf = self.inf_head(inf_feat, size) if mode == "phase2" else None
        logits = lung if inf is None else torch.cat([lung, inf], dim=1)  # B, 1|2, H, W
        pooled = bottleneck.mean(dim=(2, 3)) if self.cls_head.bottleneck_chs else None
        # The class head reads mask probabilities averaged over the image: in bf16 the sigmoid
        # keeps 8 bits and the average of near-0/1 values loses its small differences, so this
        # small head runs in fp32 under autocast.
        with torch.autocast(x.device.type, enabled=False):
            cls = self.cls_head(torch.sigmoid(logits.float()), None if pooled is None else pooled.float())
        return {"lung": lung, "inf": inf, "cls": cls, **det}


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
        self.normalize_input = cfg.input_norm


@register_model("multitask", tasks={"lung", "cls"}, phase2_tasks={"lung", "inf", "cls"},
                weights_field="encoder_pretrained")
def mtl_swin_unet(cfg: ModelConfig, pretrained: bool) -> MTLModel:
    """The paper's model (encoder from scratch, or from the timm Swin-T file `model.encoder_pretrained`)."""
    model = MTLSwinUNet(cfg)
    if pretrained and cfg.encoder_pretrained:
        load_timm_swin_encoder(model.encoder, cfg.encoder_pretrained, cfg)
    return model

"""Baselines from the field's libraries as `MTLModel`s: smp segmentation models and timm classifiers.

- `SmpSegmenter`: segmentation-models-pytorch's Unet, UnetPlusPlus or DeepLabV3Plus on a timm
  (`tu-...`) or smp encoder, 1-channel input; with `aux_params` its classification branch after the
  encoder gives the multi-task U-Net (`mtl_unet`). Submodules: `encoder`, `decoder`, `lung_head`,
  `cls_head` (smp's own modules, under the names the rest of mtlxray uses).
- `TimmClassifier`: a timm classifier (Swin-T, ViT-B, DINOv2, BEiTv2) with `in_chans=1` adapted
  from RGB weights by timm's loader. Submodules: `encoder` (the timm model without its classifier:
  it returns pooled features) and `cls_head` (timm's classifier Linear).

Each registered name (`unet`, `unetpp`, `deeplabv3p`, `mtl_unet`; `swin_t_cls`, `vit_b_cls`,
`dinov2_cls`, `beitv2_cls`) has its builder at the end of this module. Every model returns
`{"lung", "inf", "cls"}` with None for what it does not produce (its spec's `tasks` says what it
does), takes a B×1×H×W image in [0, 1] and normalises it itself, and says which
parameters form its class head's last layer (`classifier_names`, for transfer), its first N
encoder blocks (`encoder_block_prefixes`, for freezing), and its encoder features (`encode`).
"""

from __future__ import annotations

import logging
import os
from typing import Optional

# No machine here reaches a model hub: make a library that still tries fail at once, not after timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mtlxray.config import ModelConfig  # noqa: E402
from mtlxray.errors import CheckpointError, ConfigError, error_line  # noqa: E402
from mtlxray.model.base import MTLModel, Mode, check_mode, under_prefix  # noqa: E402
from mtlxray.model.detection import detect  # noqa: E402
from mtlxray.model.pretrained import (  # noqa: E402
    read_state_dict, timm_from_state_dict,
)
from mtlxray.model.registry import register_model  # noqa: E402

__all__ = ["SmpSegmenter", "TimmClassifier", "covering_prefixes"]

log = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _stats(values: tuple[float, ...], in_chans: int) -> torch.Tensor:
    """(1, C, 1, 1) normalisation constants: RGB ones averaged for a 1-channel input.

    With the RGB filters summed into one (timm's `adapt_input_conv`), a grey image normalised by
    the averaged constants gives the RGB model's response to that image copied to three channels,
    up to the small spread of the per-channel constants.
    """
    v = torch.tensor(values, dtype=torch.float32)
    if in_chans != len(values):
        v = v.mean().repeat(in_chans)
    return v.view(1, in_chans, 1, 1)


def covering_prefixes(selected: list[str], all_names: list[str]) -> list[str]:
    """The fewest module prefixes covering exactly the `selected` parameter names, in model order.

    For each selected name, the shortest dotted prefix whose parameters are all selected (so
    `encoder.blocks.0` stands for all of block 0's tensors).
    """
    chosen = set(selected)
    out: list[str] = []
    for name in all_names:
        if name not in chosen:
            continue
        parts = name.split(".")
        best = name
        for k in range(1, len(parts)):
            prefix = ".".join(parts[:k])
            if all(n in chosen for n in all_names if under_prefix(n, prefix)):
                best = prefix
                break
        if best not in out:
            out.append(best)
    return out


class _Normalised(MTLModel):
    """Shared parts: input normalisation buffers (not saved) and the zoo model interface defaults."""

    def _set_stats(self, mean: tuple[float, ...], std: tuple[float, ...], in_chans: int) -> None:
        self.register_buffer("pixel_mean", _stats(mean, in_chans), persistent=False)
        self.register_buffer("pixel_std", _stats(std, in_chans), persistent=False)

    def normalise(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) in [0, 1] -> the encoder's input scale."""
        return (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)

    def classifier_names(self) -> list[str]:
        """Module names of the class head's last layer (re-initialised on a class-count change)."""
        return []

    def encoder_block_prefixes(self, n: int) -> list[str]:
        """Parameter-name prefixes of the stem and the first `n` encoder blocks (to freeze them)."""
        raise ConfigError(f"{type(self).__name__} has no encoder blocks to count; freeze by module prefix")


class SmpSegmenter(_Normalised):
    """A segmentation-models-pytorch model (see the module docstring); lung logits at input size."""

    def __init__(self, cfg: ModelConfig, arch: str, with_cls: bool) -> None:
        super().__init__()
        import segmentation_models_pytorch as smp

        aux = {"classes": cfg.num_classes} if with_cls else None
        try:
            net = getattr(smp, arch)(encoder_name=cfg.encoder, encoder_weights=None, in_channels=cfg.in_chans,
                                     classes=1, aux_params=aux, **cfg.lib_kwargs)
        except (KeyError, ValueError, TypeError, RuntimeError) as e:
            raise ConfigError(f"model: smp {arch}(encoder={cfg.encoder!r}, lib_kwargs={cfg.lib_kwargs}) "
                              f"failed: {error_line(e)}") from None
        self.arch = arch
        self.encoder = net.encoder
        self.decoder = net.decoder
        self.lung_head = net.segmentation_head
        self.cls_head: Optional[nn.Module] = net.classification_head
        self.det_head: Optional[nn.Module] = None
        """Infection-box head on the encoder or decoder features (`model.det_head`)."""
        self.divisor = self.encoder.output_stride if net.requires_divisible_input_shape else 1
        if cfg.img_size % self.divisor:
            raise ConfigError(f"model.img_size={cfg.img_size} must be divisible by {self.divisor} for smp {arch}")
        self._set_stats(IMAGENET_MEAN, IMAGENET_STD, cfg.in_chans)

    def set_grad_checkpointing(self, mode: str) -> None:
        if mode != "none":
            raise ConfigError(f"model.grad_checkpoint={mode!r}: the smp baselines support only `none`")

    def classifier_names(self) -> list[str]:
        if self.cls_head is None:
            return []
        linears = [f"cls_head.{n}" for n, m in self.cls_head.named_modules() if isinstance(m, nn.Linear)]
        return linears[-1:]

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) in [0, 1] -> smp's encoder features (NCHW, strides 1, 2, 4, ... 32)."""
        h, w = x.shape[-2:]
        if h % self.divisor or w % self.divisor:
            raise ValueError(f"smp {self.arch}: input {h}×{w} must be divisible by {self.divisor}")
        return self.encoder(self.normalise(x))

    def forward(self, x: torch.Tensor, mode: Optional[Mode] = None) -> dict[str, Optional[torch.Tensor]]:
        """x: (B, C, H, W) in [0, 1] -> {"lung": B×1×H×W logits, "inf": None, "cls": B×classes or None}."""
        check_mode(mode or self.mode)
        feats = self.encode(x)
        on_encoder = self.det_head is not None and self.det_head.features == "encoder"
        det = detect(self.det_head, feats, None, x.shape[-2:]) if on_encoder else None  # model.det_head
        decoded = self.decoder(feats)
        if not on_encoder:
            det = detect(self.det_head, feats, decoded, x.shape[-2:])
        lung = self.lung_head(decoded)  # B, 1, H, W
        cls = self.cls_head(feats[-1]) if self.cls_head is not None else None  # B, classes
        return {"lung": lung, "inf": None, "cls": cls, **det}

    def load_encoder(self, path: str, cfg: ModelConfig) -> None:
        """Encoder weights from a local file: a timm checkpoint for `tu-` encoders (timm's loader
        adapts the input conv), else an smp/torchvision encoder state dict (RGB input filters summed)."""
        state = read_state_dict(path)
        if cfg.encoder.startswith("tu-"):
            ref = timm_from_state_dict(cfg.encoder[3:], state, path, in_chans=cfg.in_chans, num_classes=0)
            missing = self.encoder.model.load_state_dict(ref.state_dict(), strict=False).missing_keys
            if missing:
                raise CheckpointError(f"{path}: no weights for encoder.model.{missing[0]} ({len(missing)} unset)")
        else:
            from timm.models import adapt_input_conv

            own = self.encoder.state_dict()
            for key, value in list(state.items()):
                if (key in own and value.ndim == 4 and own[key].ndim == 4 and value.shape[1] != own[key].shape[1]
                        and value.shape[0] == own[key].shape[0]):
                    state[key] = adapt_input_conv(own[key].shape[1], value)
            try:
                self.encoder.load_state_dict(state)  # smp's encoders drop their classifier themselves
            except RuntimeError as e:
                raise CheckpointError(f"{path}: does not fit smp encoder {cfg.encoder}: {error_line(e)}") from None
        log.info("%s encoder initialised from %s", cfg.encoder, path)


class TimmClassifier(_Normalised):
    """A timm image classifier (see the module docstring); inputs are resized to `model.img_size`."""

    def __init__(self, cfg: ModelConfig, timm_name: str, pretrained: bool = True) -> None:
        super().__init__()
        import timm

        kwargs = dict(in_chans=cfg.in_chans, num_classes=cfg.num_classes, img_size=cfg.img_size, **cfg.lib_kwargs)
        if pretrained and cfg.pretrained:
            net = timm_from_state_dict(timm_name, read_state_dict(cfg.pretrained), cfg.pretrained, **kwargs)
            log.info("%s initialised from %s", timm_name, cfg.pretrained)
        else:
            try:
                net = timm.create_model(timm_name, pretrained=False, **kwargs)
            except (RuntimeError, TypeError, ValueError, AssertionError) as e:
                raise ConfigError(f"model: timm {timm_name}({kwargs}) failed: {error_line(e)}") from None
        head = net.get_classifier()
        if not isinstance(head, nn.Linear):
            raise ConfigError(f"model: timm {timm_name}'s classifier is a {type(head).__name__}, not a Linear")
        net.reset_classifier(0)  # the encoder now ends with timm's pooling (and fc_norm): B×features
        self.timm_name = timm_name
        self.img_size = cfg.img_size
        self.encoder = net
        self.cls_head = head
        self._set_stats(tuple(net.pretrained_cfg.get("mean", IMAGENET_MEAN)),
                        tuple(net.pretrained_cfg.get("std", IMAGENET_STD)), cfg.in_chans)

    def set_grad_checkpointing(self, mode: str) -> None:
        """`block`: timm's per-block checkpointing; `none`: off."""
        if mode not in ("none", "block"):
            raise ConfigError(f"model.grad_checkpoint={mode!r}: timm classifiers support `none` or `block`")
        self.encoder.set_grad_checkpointing(mode == "block")

    def classifier_names(self) -> list[str]:
        return ["cls_head"]

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", align_corners=False,
                              antialias=True)
        return self.normalise(x)

    def encode(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, C, H, W) in [0, 1] -> timm's intermediate features, one NCHW map per stage/block."""
        return self.encoder.forward_intermediates(self._input(x), intermediates_only=True)

    def forward(self, x: torch.Tensor, mode: Optional[Mode] = None) -> dict[str, Optional[torch.Tensor]]:
        """x: (B, C, H, W) in [0, 1] -> {"lung": None, "inf": None, "cls": B×classes logits}."""
        check_mode(mode or self.mode)
        return {"lung": None, "inf": None, "cls": self.cls_head(self.encoder(self._input(x)))}

    def _blocks(self) -> list[list[str]]:
        """Module names (under `encoder`) of each transformer block in forward order: `blocks.i` for
        ViT-style models; `layers.i.blocks.j` for Swin, a stage's patch merging with its first block."""
        enc = self.encoder
        layers = getattr(enc, "layers", None)
        if layers is not None and all(hasattr(layer, "blocks") for layer in layers):
            out = []
            for i, layer in enumerate(layers):
                merge = getattr(layer, "downsample", None)
                for j in range(len(layer.blocks)):
                    lead = [f"layers.{i}.downsample"] if j == 0 and merge is not None and any(
                        True for _ in merge.parameters()) else []
                    out.append(lead + [f"layers.{i}.blocks.{j}"])
            return out
        if hasattr(enc, "blocks"):
            return [[f"blocks.{i}"] for i in range(len(enc.blocks))]
        raise ConfigError(f"{self.timm_name}: no `blocks` or Swin `layers` to count")

    def num_encoder_blocks(self) -> int:
        return len(self._blocks())

    def encoder_block_prefixes(self, n: int) -> list[str]:
        """Prefixes of the stem (every encoder parameter before the first block: patch embedding,
        class/register tokens, position embedding) and of the first `n` blocks, collapsed to whole
        modules where possible (e.g. `encoder.layers.0`). n=0 gives []."""
        blocks = self._blocks()
        if not 0 <= n <= len(blocks):
            raise ConfigError(f"{self.timm_name} has {len(blocks)} encoder blocks; cannot freeze the first {n}")
        if n == 0:
            return []
        names = [name for name, _ in self.encoder.named_parameters()]
        first = next(i for i, name in enumerate(names) if under_prefix(name, blocks[0][-1]))
        chosen = names[:first] + [name for block in blocks[:n] for name in names
                                  if any(under_prefix(name, m) for m in block)]
        return covering_prefixes([f"encoder.{name}" for name in chosen],
                                 [name for name, _ in self.named_parameters()])


# -------------------------------------------------------------------------------------------------
# the registered models


def _smp(cfg: ModelConfig, pretrained: bool, arch: str, with_cls: bool = False) -> SmpSegmenter:
    model = SmpSegmenter(cfg, arch, with_cls=with_cls)
    if pretrained and cfg.encoder_pretrained:
        model.load_encoder(cfg.encoder_pretrained, cfg)
    return model


@register_model("segmentation", tasks={"lung"}, weights_field="encoder_pretrained")
def unet(cfg: ModelConfig, pretrained: bool) -> SmpSegmenter:
    """smp Unet, lung only."""
    return _smp(cfg, pretrained, "Unet")


@register_model("segmentation", tasks={"lung"}, weights_field="encoder_pretrained")
def unetpp(cfg: ModelConfig, pretrained: bool) -> SmpSegmenter:
    """smp UnetPlusPlus, lung only."""
    return _smp(cfg, pretrained, "UnetPlusPlus")


@register_model("segmentation", tasks={"lung"}, weights_field="encoder_pretrained")
def deeplabv3p(cfg: ModelConfig, pretrained: bool) -> SmpSegmenter:
    """smp DeepLabV3Plus, lung only."""
    return _smp(cfg, pretrained, "DeepLabV3Plus")


@register_model("multitask", tasks={"lung", "cls"}, weights_field="encoder_pretrained")
def mtl_unet(cfg: ModelConfig, pretrained: bool) -> SmpSegmenter:
    """smp Unet with its classification branch after the encoder: lung + class."""
    return _smp(cfg, pretrained, "Unet", with_cls=True)


_TIMM_INPUT = "model.img_size"
"""What the timm classifiers resize their input to."""


@register_model("classifier", tasks={"cls"}, resizes_to=_TIMM_INPUT)
def swin_t_cls(cfg: ModelConfig, pretrained: bool) -> TimmClassifier:
    """timm swin_tiny_patch4_window7_224 (or `model.timm_name`), class only."""
    return TimmClassifier(cfg, cfg.timm_name or "swin_tiny_patch4_window7_224", pretrained)


@register_model("classifier", tasks={"cls"}, resizes_to=_TIMM_INPUT)
def vit_b_cls(cfg: ModelConfig, pretrained: bool) -> TimmClassifier:
    """timm vit_base_patch16_224 (or `model.timm_name`), class only."""
    return TimmClassifier(cfg, cfg.timm_name or "vit_base_patch16_224", pretrained)


@register_model("classifier", tasks={"cls"}, resizes_to=_TIMM_INPUT)
def dinov2_cls(cfg: ModelConfig, pretrained: bool) -> TimmClassifier:
    """timm vit_small_patch14_dinov2 (`model.timm_name` for larger ones), class only."""
    return TimmClassifier(cfg, cfg.timm_name or "vit_small_patch14_dinov2", pretrained)


@register_model("classifier", tasks={"cls"}, resizes_to=_TIMM_INPUT)
def beitv2_cls(cfg: ModelConfig, pretrained: bool) -> TimmClassifier:
    """timm beitv2_base_patch16_224 (or `model.timm_name`), class only."""
    return TimmClassifier(cfg, cfg.timm_name or "beitv2_base_patch16_224", pretrained)

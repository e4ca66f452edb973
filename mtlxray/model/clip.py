"""Zero-shot classification with open_clip: class logits are image-text similarities to class prompts.

`ClipZeroShot` holds an open_clip model (`clip`: image and text towers) built from
`model.clip_arch` (a built-in open_clip architecture or a model-config JSON) and, when built with
weights, the local checkpoint `model.pretrained`. Each class has one or more prompts
(`model.prompts`, in label order); their normalised text embeddings are averaged per class and
renormalised (CLIP's prompt ensembling). The 1-channel radiograph is resized to the image tower's
size, copied to three channels and normalised with CLIP's constants; the class logits are
`exp(logit_scale) · cos(image, class)` (+ `logit_bias` for SigLIP-style models).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Optional

# No machine here reaches a model hub: make a library that still tries fail at once, not after timeouts.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from mtlxray import CLASS_NAMES  # noqa: E402
from mtlxray.config import ModelConfig  # noqa: E402
from mtlxray.errors import CheckpointError, ConfigError, MtlxError, error_line  # noqa: E402
from mtlxray.model.base import MTLModel, Mode, check_mode  # noqa: E402
from mtlxray.model.registry import register_model  # noqa: E402
from mtlxray.resources import find_config  # noqa: E402

__all__ = ["ClipZeroShot", "DEFAULT_PROMPTS", "resolve_clip_arch"]

log = logging.getLogger(__name__)

DEFAULT_PROMPTS: tuple[tuple[str, ...], ...] = (
    ("a chest X-ray of a healthy patient", "a normal chest X-ray with clear lungs"),
    ("a chest X-ray of a patient with pneumonia that is not COVID-19",
     "a chest X-ray showing a lung infection other than COVID-19"),
    ("a chest X-ray of a patient with COVID-19", "a chest X-ray showing COVID-19 pneumonia"),
)
"""Prompts for the labels of `mtlxray.CLASS_NAMES` (Normal, Non-COVID, COVID-19), in that order."""
assert len(DEFAULT_PROMPTS) == len(CLASS_NAMES)


def resolve_clip_arch(arch: str) -> str:
    """The open_clip model name for `model.clip_arch`: a built-in name as is; a model-config JSON
    (`embed_dim`, `vision_cfg`, `text_cfg`) is registered with open_clip under its file stem."""
    import open_clip

    path = Path(arch)
    if path.suffix != ".json":
        if arch not in open_clip.list_models():
            raise ConfigError(f"model.clip_arch: {arch!r} is neither an open_clip architecture nor a .json file")
        return arch
    path = find_config(path, "model.clip_arch")
    cfg = json.loads(path.read_text())
    if not all(k in cfg for k in ("embed_dim", "vision_cfg", "text_cfg")):
        hint = " (an open_clip_config.json: save its `model_cfg` as the file)" if "model_cfg" in cfg else ""
        raise ConfigError(f"model.clip_arch: {arch} lacks embed_dim/vision_cfg/text_cfg{hint}")
    open_clip.add_model_config(path)
    return path.stem


def _missing_package(clip_arch: str, arch: str, error: ImportError) -> MtlxError:
    """One line for `model.clip_arch` (registered with open_clip as `arch`) whose text tower needs
    a package that is not installed (`text_cfg.hf_tokenizer_name` or `hf_model_name`: Hugging
    Face's `transformers`)."""
    import open_clip

    text_cfg = (open_clip.get_model_config(arch) or {}).get("text_cfg", {})
    if text_cfg.get("hf_tokenizer_name"):
        what = f"its text_cfg names the Hugging Face tokenizer {text_cfg['hf_tokenizer_name']!r}, which"
    elif text_cfg.get("hf_model_name"):
        what = f"its text_cfg names the Hugging Face text model {text_cfg['hf_model_name']!r}, which"
    else:
        what = "it"
    package = error.name or str(error)
    return MtlxError(f"model.clip_arch {clip_arch}: {what} needs the `{package}` package, not installed here "
                     f"(pip install {package})")


class ClipZeroShot(MTLModel):
    """Zero-shot classifier over prompts (see the module docstring); produces only `cls`."""

    def __init__(self, cfg: ModelConfig, pretrained: bool = True) -> None:
        super().__init__()
        import open_clip

        prompts = [list(p) for p in (cfg.prompts or DEFAULT_PROMPTS)]
        if len(prompts) != cfg.num_classes:
            raise ConfigError(f"model.prompts: the built-in prompts cover {len(prompts)} classes; give "
                              f"model.prompts for model.num_classes={cfg.num_classes}")
        self.arch = resolve_clip_arch(cfg.clip_arch)
        try:
            self.clip = open_clip.create_model(self.arch, pretrained=None)  # random init: nothing downloaded
            tokenizer = open_clip.get_tokenizer(self.arch)
        except ImportError as e:
            raise _missing_package(cfg.clip_arch, self.arch, e) from None
        if pretrained and cfg.pretrained:
            self.load_weights(cfg.pretrained)
        flat = [p for per_class in prompts for p in per_class]
        self.register_buffer("prompt_tokens", tokenizer(flat), persistent=False)  # P, L
        owner = torch.tensor([c for c, per_class in enumerate(prompts) for _ in per_class])
        self.register_buffer("prompt_class", owner, persistent=False)  # P
        self.num_classes = cfg.num_classes
        pre = getattr(self.clip.visual, "preprocess_cfg", {})
        from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

        self.register_buffer("pixel_mean", torch.tensor(pre.get("mean", OPENAI_DATASET_MEAN)).view(1, 3, 1, 1),
                             persistent=False)
        self.register_buffer("pixel_std", torch.tensor(pre.get("std", OPENAI_DATASET_STD)).view(1, 3, 1, 1),
                             persistent=False)
        size = self.clip.visual.image_size
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self._class_cache: Optional[torch.Tensor] = None
        self.register_load_state_dict_post_hook(self._drop_cache)

    def load_weights(self, path: str) -> None:
        """The whole CLIP model from a local open_clip/OpenAI-layout checkpoint (weights_only)."""
        import open_clip

        if not Path(path).is_file():
            raise CheckpointError(f"{path}: no such checkpoint file (weights come from local files only)")
        try:
            open_clip.load_checkpoint(self.clip, path, strict=True, weights_only=True)
        except Exception as e:  # torch.load, safetensors and load_state_dict raise many types
            raise CheckpointError(f"{path}: does not fit open_clip {self.arch}: {error_line(e)}") from None
        log.info("open_clip %s initialised from %s", self.arch, path)

    def set_grad_checkpointing(self, mode: str) -> None:
        if mode not in ("none", "block"):
            raise ConfigError(f"model.grad_checkpoint={mode!r}: clip_zeroshot supports `none` or `block`")
        self.clip.set_grad_checkpointing(mode == "block")

    def classifier_names(self) -> list[str]:
        """None: the classes are the prompts, so no layer depends on the class count."""
        return []

    def encoder_block_prefixes(self, n: int) -> list[str]:
        raise ConfigError("clip_zeroshot: freeze by module prefix (clip.visual, clip.transformer, ...)")

    def class_embeddings(self) -> torch.Tensor:
        """(classes, D): the mean of each class's normalised prompt embeddings, renormalised.

        In eval mode they are computed once and kept (the text tower is then fixed), so evaluating
        costs the image tower only; `train()` and `load_state_dict` drop the kept copy.
        """
        cached = self._class_cache
        if not self.training and cached is not None and cached.device == self.prompt_tokens.device:
            return cached
        text = self.clip.encode_text(self.prompt_tokens, normalize=True)  # P, D
        sums = text.new_zeros(self.num_classes, text.shape[1]).index_add_(0, self.prompt_class, text)
        out = F.normalize(sums, dim=-1)
        if not self.training:
            out = self._class_cache = out.detach()
        return out

    def train(self, mode: bool = True) -> "ClipZeroShot":
        self._class_cache = None
        return super().train(mode)

    def _drop_cache(self, *_args) -> None:
        self._class_cache = None

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 1|3, H, W) in [0, 1] -> (B, D) normalised image embeddings."""
        if x.shape[-2:] != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False, antialias=True)
            x = x.clamp(0, 1)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        x = (x - self.pixel_mean.to(x.dtype)) / self.pixel_std.to(x.dtype)
        return self.clip.encode_image(x, normalize=True)

    def forward(self, x: torch.Tensor, mode: Optional[Mode] = None) -> dict[str, Optional[torch.Tensor]]:
        """x: (B, 1, H, W) in [0, 1] -> {"lung": None, "inf": None, "cls": B×classes logits}."""
        check_mode(mode or self.mode)
        image = self.encode(x)  # B, D
        text = self.class_embeddings().to(image.dtype)  # C, D
        logits = self.clip.logit_scale.exp() * image @ text.t()  # B, C
        if getattr(self.clip, "logit_bias", None) is not None:
            logits = logits + self.clip.logit_bias
        return {"lung": None, "inf": None, "cls": logits}


@register_model("zero-shot", tasks={"cls"}, resizes_to="the image tower's size (model.clip_arch)")
def clip_zeroshot(cfg: ModelConfig, pretrained: bool) -> ClipZeroShot:
    """open_clip, class logits = similarities to the class prompts (weights: `model.pretrained`)."""
    return ClipZeroShot(cfg, pretrained)

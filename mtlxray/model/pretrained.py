"""Weights from local files: checkpoints read safely, timm's own loader, timm Swin-T names onto the
paper's encoder, and loading across a changed class head (transfer to another class count).

No function here reaches a model hub: a path that does not exist is a `CheckpointError` in one
line, and timm receives the state dict in memory (`pretrained_cfg_overlay={"state_dict": ...}`),
so it applies its per-architecture conversions (`checkpoint_filter_fn`: old checkpoint layouts,
resized position embeddings and relative-position tables) and its input-conv adaptation
(`adapt_input_conv`: RGB filters summed for one channel) without any download.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

import torch
import torch.nn as nn

from mtlxray.errors import CheckpointError, error_line
from mtlxray.model.base import under_prefix

if TYPE_CHECKING:
    from mtlxray.config import ModelConfig
    from mtlxray.model.swin import SwinEncoder

__all__ = [
    "read_state_dict", "timm_from_state_dict", "timm_swin_to_mtlxray", "load_timm_swin_encoder",
    "load_state_dict_transfer",
]

log = logging.getLogger(__name__)

SWIN_T = "swin_tiny_patch4_window7_224"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors on CPU: .safetensors, or .pth/.bin/.pt read with `weights_only=True`.

    A training checkpoint holding `state_dict`, `model` or an EMA copy is unwrapped (timm's
    `load_state_dict`, which also drops DDP/compile prefixes).
    """
    p = Path(path)
    if not p.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file (weights come from local files only)")
    from timm.models import load_state_dict

    try:
        state = load_state_dict(str(p), device="cpu", weights_only=True)
    except Exception as e:  # torch.load/safetensors raise many types for corrupt or unsafe files
        raise CheckpointError(f"{path}: unreadable checkpoint: {error_line(e)}") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"{path}: not a state dict of tensors")
    return state


def timm_from_state_dict(name: str, state_dict: dict[str, torch.Tensor], source: str, **kwargs) -> nn.Module:
    """`timm.create_model(name, **kwargs)` with its weights loaded from `state_dict` by timm's loader.

    timm adapts the input conv to `in_chans`, applies the architecture's checkpoint filter
    (img_size, window size) and drops the classifier when its class count differs from the
    model's (that head keeps its random init; a line is logged). Errors name `source`.
    """
    import timm

    pcfg = timm.models.get_pretrained_cfg(name)
    if pcfg is None:
        raise CheckpointError(f"{source}: timm has no architecture {name!r}")
    overlay: dict = {"state_dict": state_dict}
    classifier = pcfg.classifier if isinstance(pcfg.classifier, str) else None
    if classifier and f"{classifier}.weight" in state_dict:
        # The checkpoint's own class count: timm keeps its head when the model's count equals it.
        overlay["num_classes"] = state_dict[f"{classifier}.weight"].shape[0]
    try:
        model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs)
    except (RuntimeError, KeyError, ValueError, AssertionError) as e:
        raise CheckpointError(f"{source}: does not fit timm {name}: {error_line(e)}") from None
    for cfg in {id(c): c for c in (getattr(model, "pretrained_cfg", None), getattr(model, "default_cfg", None))
                if isinstance(c, dict)}.values():
        cfg.pop("state_dict", None)  # do not keep a second copy of the weights alive
    n_cls = kwargs.get("num_classes")
    if classifier and n_cls and overlay.get("num_classes", n_cls) != n_cls:
        log.info("%s: class head %s has %d classes, the model %d: re-initialised", source, classifier,
                 overlay["num_classes"], n_cls)
    return model


# timm's (>= 0.9) Swin names -> mtlxray.model.swin.SwinEncoder names. Both put the patch merging at the
# start of stages 1..3 and the final LayerNorm after the last stage; timm's filter converts older
# (Microsoft) layouts before this mapping runs.
_SWIN_RULES: tuple[tuple[re.Pattern, str], ...] = (
    (re.compile(r"^layers\.(\d+)\."), r"stages.\1."),
    (re.compile(r"\.mlp\.fc1\."), ".mlp.0."),
    (re.compile(r"\.mlp\.fc2\."), ".mlp.2."),
)
_SWIN_SKIP = re.compile(r"(^head\.|\.relative_position_index$|\.attn_mask$)")


def timm_swin_to_mtlxray(name: str) -> str | None:
    """Our encoder's name for a timm Swin tensor name; None for tensors we derive (index, mask) or lack (head)."""
    if _SWIN_SKIP.search(name):
        return None
    for pattern, repl in _SWIN_RULES:
        name = pattern.sub(repl, name)
    return name


def load_timm_swin_encoder(encoder: "SwinEncoder", path: str | Path, cfg: "ModelConfig") -> list[str]:
    """Initialise the paper's encoder from a timm Swin checkpoint; returns the names it set.

    A timm Swin with our shape (`embed_dim`, `depths`, `num_heads`, `window_size`, `img_size`,
    `in_chans`) is built by timm's loader from the file, which sums the RGB patch-embedding
    filters into `in_chans` channels and resizes relative-position tables only where a window
    differs; its tensors are then copied under our names. Every tensor of ours must be set and
    every timm tensor placed, with equal shapes, or `CheckpointError` names the first that is not.
    """
    kwargs = dict(in_chans=cfg.in_chans, num_classes=0, img_size=cfg.img_size, patch_size=cfg.patch_size,
                  embed_dim=cfg.embed_dim, depths=tuple(cfg.depths), num_heads=tuple(cfg.num_heads),
                  window_size=cfg.window_size, mlp_ratio=cfg.mlp_ratio)
    name = cfg.timm_name or SWIN_T
    ref = timm_from_state_dict(name, read_state_dict(path), str(path), **kwargs)
    ours = encoder.state_dict()
    mapped: dict[str, torch.Tensor] = {}
    for key, value in ref.state_dict().items():
        target = timm_swin_to_mtlxray(key)
        if target is None:
            continue
        if target not in ours:
            raise CheckpointError(f"{path}: timm tensor {key} has no place in the encoder (mapped to {target})")
        if ours[target].shape != value.shape:
            raise CheckpointError(f"{path}: {key} has shape {tuple(value.shape)}, encoder.{target} "
                                  f"{tuple(ours[target].shape)}")
        mapped[target] = value
    unset = [k for k in ours if k not in mapped]
    if unset:
        raise CheckpointError(f"{path}: no timm tensor for encoder.{unset[0]} ({len(unset)} unset)")
    encoder.load_state_dict(mapped, strict=True)
    log.info("encoder initialised from %s (timm %s, %d tensors, input conv adapted to %d channel(s))",
             path, name, len(mapped), cfg.in_chans)
    return sorted(mapped)


def load_state_dict_transfer(model: nn.Module, state_dict: dict[str, torch.Tensor],
                             source: str = "state dict") -> list[str]:
    """Load `state_dict` into `model`, re-initialising the class head's last layer where its shape differs.

    The head is what `model.classifier_names()` lists (module names, e.g. `cls_head.fc`); a shape
    mismatch under one of them re-initialises that whole module (`reset_parameters()`), for
    example 3 -> 4 or 3 -> 2 classes. Any other mismatch, and any missing or unexpected tensor, is
    a `CheckpointError` naming the tensor. Returns the names of the re-initialised tensors (empty
    when everything fit) and logs them in one line.
    """
    heads: Iterable[str] = getattr(model, "classifier_names", lambda: [])()
    heads = list(heads)
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    if missing or unexpected:
        parts = ([f"missing {missing[0]}" + (f" (+{len(missing) - 1} more)" if len(missing) > 1 else "")] if missing
                 else []) + ([f"unexpected {unexpected[0]}" + (f" (+{len(unexpected) - 1} more)"
                                                                if len(unexpected) > 1 else "")] if unexpected else [])
        raise CheckpointError(f"{source}: does not fit {type(model).__name__}: {', '.join(parts)}")
    reset: list[str] = []
    for key, value in state_dict.items():
        if value.shape == own[key].shape:
            continue
        head = next((h for h in heads if under_prefix(key, h)), None)
        if head is None:
            allowed = f" (only the class head's last layer, {', '.join(heads)}, may differ)" if heads else ""
            raise CheckpointError(f"{source}: {key} has shape {tuple(value.shape)}, the model "
                                  f"{tuple(own[key].shape)}{allowed}")
        if head not in reset:
            reset.append(head)
    keep = {k: v for k, v in state_dict.items() if not any(under_prefix(k, h) for h in reset)}
    model.load_state_dict(keep, strict=False)
    reinit = [k for k in own if any(under_prefix(k, h) for h in reset)]
    for head in reset:
        module = model.get_submodule(head)
        if not hasattr(module, "reset_parameters"):
            raise CheckpointError(f"{source}: {head} differs in shape and cannot be re-initialised")
        module.reset_parameters()
    if reinit:
        log.info("%s: re-initialised %s (class count changed)", source, ", ".join(reinit))
    return reinit

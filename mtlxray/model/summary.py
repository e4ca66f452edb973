"""Parameter counts per part and FLOPs per image: `mtlxray model-summary`.

The Swin-UNet's parts are printed beside the paper's figures; any other model (the baselines of
the model zoo) by its top-level submodules.
"""

from __future__ import annotations

import json
import logging

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from mtlxray.config import Config
from mtlxray.model.net import MultiTaskUNet
from mtlxray.model.registry import build_model
from mtlxray.paper import PART_PARAMS

__all__ = ["count_params_by_part", "count_params_by_child", "count_flops", "summarise_model"]

log = logging.getLogger(__name__)

_PARTS = {
    "encoder": ("encoder",),
    "ppm": ("ppm",),
    "decoders": ("lung_decoder", "inf_decoder"),
    "lung_head": ("lung_head",),
    "infection_head": ("inf_head",),
    "cls_head": ("cls_head",),
}


def _numel(module: nn.Module | None) -> int:
    return sum(p.numel() for p in module.parameters()) if module is not None else 0


def count_params_by_part(model: nn.Module) -> dict[str, int]:
    """Parameters of each part (keys of PART_PARAMS), counting frozen ones too."""
    counts = {part: sum(_numel(getattr(model, name, None)) for name in names) for part, names in _PARTS.items()}
    counts["total"] = _numel(model)
    return counts


def count_params_by_child(model: nn.Module) -> dict[str, int]:
    """Parameters under each top-level submodule (and directly on the model), frozen ones too."""
    counts = {name: _numel(child) for name, child in model.named_children()}
    own = sum(p.numel() for p in model.parameters(recurse=False))
    if own:
        counts["(model)"] = own
    counts["total"] = _numel(model)
    return counts


def count_flops(model: nn.Module, img_size: int, in_chans: int = 1, mode: str = "phase2") -> dict[str, float]:
    """FLOPs for one image: forward, and forward + backward of the summed outputs."""
    was_training = model.training
    model.eval()  # batch 1 cannot train BatchNorm on 1×1 pooled maps; eval counts the same FLOPs
    x = torch.rand(1, in_chans, img_size, img_size)
    try:
        with torch.no_grad():  # warm-up: what a model computes once and keeps (CLIP's class
            model(x, mode=mode)  # embeddings in eval mode) is amortised, not counted per image
        with FlopCounterMode(display=False) as fwd:
            with torch.no_grad():
                model(x, mode=mode)
        with FlopCounterMode(display=False) as both:
            out = model(x, mode=mode)
            sum(v.float().sum() for v in out.values() if v is not None).backward()
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {"forward": float(fwd.get_total_flops()), "forward_backward": float(both.get_total_flops())}


def _table(counts: dict[str, int], flops: dict[str, float], name: str, img_size: int, mode: str) -> str:
    lines = [f"model {name}, {img_size}x{img_size} input, {mode}",
             f"{'part':<16}{'params':>14}{'paper':>14}{'ratio':>8}"]
    for part, n in counts.items():
        paper = PART_PARAMS[part]
        lines.append(f"{part:<16}{n:>14,}{paper:>14,.0f}{n / paper:>8.3f}")
    lines.append(f"GFLOPs/image: forward {flops['forward'] / 1e9:.2f}, "
                 f"forward+backward {flops['forward_backward'] / 1e9:.2f}")
    return "\n".join(lines)


def _child_table(counts: dict[str, int], flops: dict[str, float], name: str, img_size: int, mode: str,
                 tasks: list[str]) -> str:
    lines = [f"model {name}, {img_size}x{img_size} input, {mode}, outputs {', '.join(tasks)}",
             f"{'part':<16}{'params':>14}"]
    lines += [f"{part:<16}{n:>14,}" for part, n in counts.items()]
    lines.append(f"GFLOPs/image: forward {flops['forward'] / 1e9:.2f}, "
                 f"forward+backward {flops['forward_backward'] / 1e9:.2f}")
    return "\n".join(lines)


def summarise_model(cfg: Config, as_json: bool = False) -> str:
    """The parameter counts per part and GFLOPs per image of the model `cfg` builds (no weights
    loaded), as a table or as JSON."""
    model = build_model(cfg.model, pretrained=False)  # counting needs no weights
    mode = cfg.phase.name
    model.set_mode(mode)
    flops = count_flops(model, cfg.model.img_size, cfg.model.in_chans, mode)
    if not isinstance(model, MultiTaskUNet):  # a baseline: its own parts, no paper column
        counts = count_params_by_child(model)
        tasks = sorted(model.tasks)
        if as_json:
            return json.dumps({
                "model": cfg.model.name, "img_size": cfg.model.img_size, "mode": mode, "tasks": tasks,
                "params": counts, "paper_params": None, "gflops": {k: v / 1e9 for k, v in flops.items()},
            }, indent=2)
        return _child_table(counts, flops, cfg.model.name, cfg.model.img_size, mode, tasks)
    counts = count_params_by_part(model)
    if as_json:
        return json.dumps({
            "model": cfg.model.name, "img_size": cfg.model.img_size, "mode": mode,
            "params": counts, "paper_params": PART_PARAMS,
            "gflops": {k: v / 1e9 for k, v in flops.items()},
        }, indent=2)
    return _table(counts, flops, cfg.model.name, cfg.model.img_size, mode)

"""AdamW parameter groups from the phase's learning-rate multipliers, and the cosine schedule."""

from __future__ import annotations

import math
from functools import partial

import torch
from torch import nn

from mtlxray.config import Config
from mtlxray.errors import ConfigError
from mtlxray.model.base import under_prefix

__all__ = ["no_weight_decay", "param_groups", "describe_param_groups", "build_optimizer", "cosine_factor",
           "epoch_held", "build_scheduler"]


def no_weight_decay(name: str, p: nn.Parameter) -> bool:
    """Norm weights, biases (all 1-D tensors) and relative-position bias tables get no decay."""
    return p.ndim <= 1 or "relative_position_bias_table" in name


def param_groups(model: nn.Module, cfg: Config) -> list[dict]:
    """Trainable parameters grouped by lr multiplier (cfg.phase.lr_mult) and decay/no-decay.

    Each group carries `name` ("<prefix>/decay" ...), `lr_mult` and `lr` = optim.lr × lr_mult.
    The longest matching prefix wins; `default` covers the rest (1.0 when absent).
    """
    mults = dict(cfg.phase.lr_mult)
    default = mults.pop("default", 1.0)
    names = [n for n, _ in model.named_parameters()]
    for prefix in mults:
        if not any(under_prefix(n, prefix) for n in names):
            raise ConfigError(f"phase.lr_mult: prefix `{prefix}` matches no parameter of the model")
    groups: dict[tuple[str, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        hits = [k for k in mults if under_prefix(name, k)]
        key = max(hits, key=len) if hits else "default"
        mult = mults[key] if hits else default
        decay = not (cfg.optim.no_decay_norm_bias and no_weight_decay(name, p))
        group = groups.setdefault((key, decay), {
            "name": f"{key}/{'decay' if decay else 'no_decay'}", "params": [], "lr_mult": mult,
            "lr": cfg.optim.lr * mult, "weight_decay": cfg.optim.weight_decay if decay else 0.0,
        })
        group["params"].append(p)
    return list(groups.values())


def describe_param_groups(model: nn.Module, groups: list[dict]) -> list[dict]:
    """Per group: name, modules (the shortest module prefixes covering its parameters), parameter
    count, learning rate and weight decay, for `mtlxray model-summary --lr-groups`."""
    names = {id(p): n for n, p in model.named_parameters()}
    out = []
    for g in groups:
        params = [names[id(p)] for p in g["params"]]
        modules = sorted({n.rsplit(".", 1)[0] if "." in n else n for n in params})
        covered: list[str] = []
        for m in modules:  # keep the shallowest prefixes: `encoder.stages.0` covers its blocks
            if not any(m == c or m.startswith(c + ".") for c in covered):
                covered.append(m)
        top = sorted({m.split(".")[0] for m in covered})
        out.append({"name": g["name"], "modules": top if len(covered) > 8 else covered,
                    "params": sum(p.numel() for p in g["params"]), "lr": g["lr"],
                    "weight_decay": g["weight_decay"]})
    return out


def build_optimizer(model: nn.Module, cfg: Config, fused: bool = False) -> torch.optim.Optimizer:
    """AdamW (or Adam, optim.name) over `param_groups`. `fused` selects torch's fused kernel, which
    can skip a whole update on the device when told the gradients were not finite (train.nonfinite)."""
    o = cfg.optim
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    return cls(param_groups(model, cfg), lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay,
               fused=fused or None)


def cosine_factor(step: int, *, total: int, warmup: int, floor: float) -> float:
    """LR multiplier at `step`: linear warmup to 1, then cosine from 1 down to `floor` at `total`."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def epoch_held(factor, step: int, *, steps_per_epoch: int, warmup: int) -> float:
    """`factor` held through each epoch at its value at the epoch's first step (after the warmup,
    which stays per step): the cosine of `CosineAnnealingLR` stepped once per epoch."""
    return factor(step if step < warmup else max(warmup, step // steps_per_epoch * steps_per_epoch))


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: Config, total_steps: int, steps_per_epoch: int = 1):
    """Cosine lr → min_lr with warmup (schedule.min_lr_mode: one factor for every group, which keeps
    their ratios, or each group down to min_lr itself), updated every optimizer step or, with
    `schedule.interval: epoch`, at the start of every epoch of `steps_per_epoch` steps."""
    s = cfg.schedule
    if s.min_lr_mode == "relative":
        floors = [s.min_lr / cfg.optim.lr] * len(optimizer.param_groups)
    else:
        floors = [min(1.0, s.min_lr / g["lr"]) for g in optimizer.param_groups]
    fns = [partial(cosine_factor, total=total_steps, warmup=s.warmup_steps, floor=f) for f in floors]
    if s.interval == "epoch":
        fns = [partial(epoch_held, fn, steps_per_epoch=steps_per_epoch, warmup=s.warmup_steps) for fn in fns]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, fns)

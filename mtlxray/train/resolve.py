"""The config a run trains with: the file's, with what the launcher, the world size and the device decide.

`resolve(cfg, env, world)` is pure: the caller's config is left as it was, and the returned one
differs from it only in the keys the environment decides, each logged as `key file -> resolved`:

- `run.precision` and `run.compile` from `accelerate launch --mixed_precision/--dynamo_backend`
  (which accelerate passes to the processes as ACCELERATE_MIXED_PRECISION and
  ACCELERATE_DYNAMO_BACKEND), then `auto` precision from the device;
- `data.batch_size` and `optim.grad_accum` from `data.global_batch_size` and the world size;
- `data.workers: auto` from the CPUs this process has and what its device needs
  (`mtlxray.hardware.resolve_workers`); on a resume, the count the checkpoint trained with
  (`replay_workers`), since an epoch's batches depend on it.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple, Optional

import yaml

from mtlxray.config import Config, config_to_dict
from mtlxray.dist import WorldInfo
from mtlxray.errors import ConfigError
from mtlxray.hardware import resolve_precision, resolve_workers
from mtlxray.train.rundir import flatten

__all__ = ["Resolved", "resolve", "resolve_global_batch", "replay_workers"]

logger = logging.getLogger(__name__)


class Resolved(NamedTuple):
    config: Config
    """The config the run trains with."""
    precision_source: str
    """What chose run.precision: the launcher's flag or the config's value (for run.json)."""


def _launcher_flags(cfg: Config, env: Mapping[str, str]) -> Optional[str]:
    """Reconcile `accelerate launch --mixed_precision/--dynamo_backend` with `cfg`, in place.

    `no` (also the launcher's default, so an explicit flag cannot be told apart) makes
    run.precision=auto fp32 and is overridden, with a warning line, by an explicit run.precision=bf16;
    `bf16` is honoured unless run.precision asks for fp32, and fp16 (which mtlxray does not train in)
    is refused, each disagreement in one line; a dynamo backend other than `no` turns on run.compile.
    Without this, accelerate would silently override or be overridden. Returns the launcher flag that
    set run.precision, None when the config did."""
    precision = cfg.run.precision
    launched = env.get("ACCELERATE_MIXED_PRECISION", "").lower()
    if launched == "no" and cfg.run.precision == "auto":
        # `accelerate launch --mixed_precision no` (also its default) asks for fp32; `auto` defers to it.
        cfg.run.precision = "fp32"
    elif launched == "no" and cfg.run.precision == "bf16":
        logger.warning("accelerate launch --mixed_precision no (the launcher's default) and run.precision=bf16: "
                       "training in bf16 as run.precision says; run.precision=fp32 (or auto) trains in fp32")
    if launched == "fp16":
        raise ConfigError("accelerate launch --mixed_precision fp16: mtlxray trains in bf16 or fp32; "
                          "set --mixed_precision bf16 (or no) and run.precision")
    if launched == "bf16":
        if cfg.run.precision == "fp32":
            raise ConfigError("accelerate launch --mixed_precision bf16 disagrees with run.precision=fp32; "
                              "choose one (run.precision=bf16 or --mixed_precision no)")
        cfg.run.precision = "bf16"
    dynamo = env.get("ACCELERATE_DYNAMO_BACKEND", "no").lower()
    if dynamo not in ("no", ""):
        if dynamo != "inductor":
            raise ConfigError(f"accelerate launch --dynamo_backend {dynamo}: mtlxray compiles with inductor "
                              "(run.compile=true or --dynamo_backend inductor)")
        cfg.run.compile = True
    return f"accelerate launch --mixed_precision {launched}" if cfg.run.precision != precision else None


def resolve_global_batch(cfg: Config, world_size: int) -> None:
    """Derive the per-process micro-batch and gradient accumulation from data.global_batch_size, in place.

    The fewest accumulation steps whose micro-batch fits data.batch_size; the global batch must
    split evenly over the processes and steps (ConfigError naming the numbers otherwise)."""
    total = cfg.data.global_batch_size
    if total is None:
        return
    if total % world_size:
        raise ConfigError(f"data.global_batch_size={total} does not split over {world_size} processes")
    per_process = total // world_size
    for accum in range(1, per_process + 1):
        if per_process % accum == 0 and per_process // accum <= cfg.data.batch_size:
            cfg.data.batch_size, cfg.optim.grad_accum = per_process // accum, accum
            return


def resolve(cfg: Config, env: Mapping[str, str], world: WorldInfo, device_type: Optional[str] = None) -> Resolved:
    """The config this process trains with (a copy; `cfg` is not changed); rank 0 logs each key it changed.

    device_type: `cuda` or `cpu` for `run.precision=auto` (default: cuda where torch sees a GPU)."""
    if device_type is None:
        import torch

        device_type = "cuda" if torch.cuda.is_available() else "cpu"
    out = copy.deepcopy(cfg)
    source = _launcher_flags(out, env) or f"run.precision={cfg.run.precision}"
    out.run.precision = resolve_precision(out.run.precision, device_type)
    resolve_global_batch(out, world.world_size)
    out.data.workers, why = resolve_workers(out.data.workers, augment_in_loader=out.data.augment.in_loader,
                                            env=env, world=world, device_type=device_type)
    if cfg.data.workers == "auto" and world.rank == 0:
        logger.info("data.workers: %s", why)
    before, after = flatten(config_to_dict(cfg)), flatten(config_to_dict(out))
    for key in after:
        if before.get(key) != after[key] and world.rank == 0:  # every rank resolves the same
            logger.info("config: %s %s -> %s", key, before.get(key), after[key])
    return Resolved(out, source)


def replay_workers(cfg: Config, ckpt: Path) -> None:
    """`data.workers: auto` resumed from `ckpt`: the count it trained with, in place (logged where it
    differs from the one resolved here). The loader interleaves one stream per worker, so the count
    decides an epoch's batches, and a resume that changed it would be refused as another run."""
    saved = ckpt / "config.yaml"
    if not saved.is_file():
        return  # verify_checkpoint names the missing part
    trained = ((yaml.safe_load(saved.read_text()) or {}).get("data") or {}).get("workers")
    if isinstance(trained, int) and not isinstance(trained, bool) and trained != cfg.data.workers:
        logger.info("config: data.workers %s -> %s (the count %s trained with; data.workers: auto)",
                    cfg.data.workers, trained, ckpt)
        cfg.data.workers = trained

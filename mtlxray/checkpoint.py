"""Atomic checkpoints with the exact training state, and loading a model back without accelerate.

Layout under runs/<name>/checkpoints/:

    step-000120/              one complete checkpoint (renamed into place only when complete)
      model.safetensors       unwrapped fp32 weights, usable without accelerate
      config.yaml             the resolved config of the run
      state.json              TrainState: step, epoch, batch_in_epoch, samples_seen, best, phase
      ...                     accelerate's save_state: optimizer, scheduler, RNG per rank
                              (DeepSpeed: its sharded engine state)
    last -> step-000120       symlink, swapped atomically with os.replace
    best -> step-000100       symlink to the best evaluation so far
    .tmp-step-000140/         an interrupted write; ignored and cleaned at the next save
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from mtlxray.config import Config, dump_config, load_config
from mtlxray.errors import CheckpointError
from mtlxray.model.base import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["TrainState", "save_checkpoint", "find_resume", "resolve_checkpoint", "read_state",
           "load_model_weights", "load_model_from_checkpoint", "WEIGHTS_NAME", "STATE_NAME", "CONFIG_NAME"]

logger = logging.getLogger(__name__)

STATE_NAME = "state.json"


@dataclass
class TrainState:
    """The loop's counters: everything besides tensors needed to continue exactly."""

    step: int = 0
    """Optimizer steps done."""
    epoch: int = 0
    batch_in_epoch: int = 0
    """Batches of `epoch` already consumed on each rank (the loader's start_batch on resume)."""
    samples_seen: int = 0
    """Training samples consumed across all ranks."""
    best_metric: Optional[float] = None
    best_step: Optional[int] = None
    nan_skipped: int = 0
    phase: str = "phase1"

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str) -> "TrainState":
        try:
            data = json.loads(text)
            return cls(**data)
        except (json.JSONDecodeError, TypeError) as e:
            raise CheckpointError(f"{source}: unreadable training state: {e}") from None


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def _point(root: Path, link: str, target: Path) -> None:
    """Atomically make root/link a relative symlink to target."""
    tmp = root / f".{link}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, root / link)


def _collect_garbage(root: Path) -> None:
    """Remove step dirs that neither `last` nor `best` points to, and stale temp dirs."""
    keep = {(root / link).resolve() for link in ("last", "best") if (root / link).exists()}
    for d in root.iterdir():
        if d.name.startswith(".tmp-") or (d.name.startswith("step-") and d.resolve() not in keep):
            shutil.rmtree(d, ignore_errors=True)


def save_checkpoint(accelerator, model, root: Path, state: TrainState, cfg: Config, *,
                    last: bool, best: bool) -> Path:
    """Write a complete checkpoint of the current step on every rank and point last/best at it.

    All ranks write into one temp dir (DeepSpeed shards; DDP lets rank 0 write), then rank 0
    renames it into place after a barrier, so a reader never sees a half-written checkpoint.
    """
    final = _step_dir(root, state.step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    if not final.exists():
        accelerator.save_state(str(tmp))
        weights = accelerator.get_state_dict(model)  # collective under ZeRO-3
        if accelerator.is_main_process:
            from safetensors.torch import save_file

            weights = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
            save_file(weights, str(tmp / WEIGHTS_NAME))
            (tmp / CONFIG_NAME).write_text(dump_config(cfg))
            (tmp / STATE_NAME).write_text(state.to_json())
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            os.replace(tmp, final)
    if accelerator.is_main_process:
        if last:
            _point(root, "last", final)
        if best:
            _point(root, "best", final)
        _collect_garbage(root)
        logger.info("checkpoint step %d -> %s%s%s", state.step, final, " [last]" if last else "",
                    " [best]" if best else "")
    accelerator.wait_for_everyone()
    return final


def _complete(d: Path) -> bool:
    return (d / STATE_NAME).is_file() and (d / WEIGHTS_NAME).is_file()


def find_resume(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under root (via `last`, else the highest step dir)."""
    if not root.is_dir():
        return None
    last = root / "last"
    if last.exists() and _complete(last):
        return last.resolve()
    steps = sorted((d for d in root.glob("step-*") if _complete(d)), key=lambda d: d.name)
    return steps[-1] if steps else None


def read_state(ckpt: Path) -> TrainState:
    path = ckpt / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint (no {STATE_NAME})")
    return TrainState.from_json(path.read_text(), str(path))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from a dir, a `last`/`best` link or a model.safetensors path."""
    p = Path(path)
    if p.is_file() and p.name == WEIGHTS_NAME:
        p = p.parent
    if not (p / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} there (not a checkpoint)")
    return p.resolve()


def load_model_weights(model, path: str | Path, map_location: str = "cpu") -> None:
    """Load a checkpoint's model.safetensors into `model` strictly."""
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path)
    weights = load_file(str(ckpt / WEIGHTS_NAME), device=map_location)
    try:
        model.load_state_dict(weights, strict=True)
    except RuntimeError as e:
        first = str(e).strip().splitlines()
        raise CheckpointError(f"{ckpt / WEIGHTS_NAME}: does not fit the model: "
                              f"{' '.join(line.strip() for line in first[:3])}") from None


def load_model_from_checkpoint(path: str | Path, map_location: str = "cpu"):
    """(model in eval mode, cfg) from a checkpoint folder or its model.safetensors."""
    from mtlxray.model.base import MTLModel

    model = MTLModel.from_pretrained(resolve_checkpoint(path), map_location)
    return model, model.config

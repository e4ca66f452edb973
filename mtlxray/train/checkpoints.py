"""Writing checkpoints: finite-only, atomic, complete, and the rotation of `last`, `best` and old steps.

The folder format and reading it (`TrainState`, `verify_checkpoint`, `find_resume`, loading) are
`mtlxray.checkpoint`'s; this module is the training side:
- A checkpoint folder appears only when every part is written (temp folder, barrier, rename).
- A model with a non-finite parameter or buffer is never written (`assert_finite`).
- A write that fails (a full disk) raises CheckpointError in one line naming the checkpoint, the
  reason and the free space; its temp folder is removed and `last` keeps pointing at the previous one.
- Only the step folders `last` and `best` point to are kept.
"""

from __future__ import annotations

import logging
import os
import shutil
from pathlib import Path
from typing import Optional

import torch

from mtlxray.checkpoint import CONFIG_NAME, STATE_NAME, WEIGHTS_NAME, TrainState, all_finite
from mtlxray.config import Config, dump_config
from mtlxray.errors import CheckpointError, NonFiniteLossError
from mtlxray.io import default_file_mode, write_error

__all__ = ["save_checkpoint", "assert_finite"]

logger = logging.getLogger(__name__)


def _step_dir(root: Path, step: int) -> Path:
    return root / f"step-{step:06d}"


def _point(root: Path, link: str, target: Path) -> None:
    """Atomically make root/link a relative symlink to target."""
    tmp = root / f".{link}.tmp"
    tmp.unlink(missing_ok=True)
    os.symlink(target.name, tmp)
    os.replace(tmp, root / link)


def _collect_garbage(root: Path) -> None:
    """Remove step dirs that neither `last` nor `best` points to, and stale temp dirs.

    Only finite, complete checkpoints are ever linked, so the newest good one always survives."""
    keep = {(root / link).resolve() for link in ("last", "best") if (root / link).exists()}
    for d in root.iterdir():
        if d.name.startswith((".tmp-", ".old-")) or (d.name.startswith("step-") and d.resolve() not in keep):
            shutil.rmtree(d, ignore_errors=True)


def assert_finite(accelerator, model: torch.nn.Module, step: int) -> None:
    """Raise NonFiniteLossError on every rank unless every rank's parameters and buffers are finite."""
    ok = all_finite(model).to(accelerator.device).float()
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(ok, op=torch.distributed.ReduceOp.MIN)
    if ok.item() < 1:
        raise NonFiniteLossError(f"the model's weights became non-finite by step {step}; nothing was saved "
                                 "and the last good checkpoint is kept (lower optim.lr or set optim.grad_clip)")


def _parts(folder: Path) -> dict[str, int]:
    return {str(p.relative_to(folder)): p.stat().st_size
            for p in sorted(folder.rglob("*")) if p.is_file() and p.name != STATE_NAME}


def save_checkpoint(accelerator, model, raw_model: torch.nn.Module, root: Path, state: TrainState, cfg: Config, *,
                    last: bool, best: bool) -> Path:
    """Write a complete checkpoint of the current step on every rank and point last/best at it.

    All ranks write into one temp dir (DeepSpeed shards; DDP lets rank 0 write), then rank 0
    renames it into place after a barrier, so a reader never sees a half-written checkpoint. A
    step folder left by another run trajectory (a resume from an older checkpoint) is replaced,
    never reused. Raises NonFiniteLossError, writing nothing, when the model is not finite.
    `model` is the prepared (wrapped) model, `raw_model` the same model unwrapped.
    """
    assert_finite(accelerator, raw_model, state.step)
    final = _step_dir(root, state.step)
    tmp = root / f".tmp-{final.name}"
    if accelerator.is_main_process:
        root.mkdir(parents=True, exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    error: Optional[Exception] = None
    try:
        accelerator.save_state(str(tmp))
    except (OSError, RuntimeError) as e:  # torch reports a failed write (a full disk) as a RuntimeError
        error = e
    # A collective under ZeRO-3; plain parameters otherwise (accelerate's unwrap would import DeepSpeed).
    deepspeed = type(model).__module__.startswith("deepspeed")
    weights = accelerator.get_state_dict(model) if deepspeed else raw_model.state_dict()
    if not _any_rank(accelerator, error is not None) and accelerator.is_main_process:
        from safetensors import SafetensorError

        try:
            _write_parts(weights, tmp, state, cfg, accelerator.num_processes)
        except (OSError, RuntimeError, SafetensorError) as e:
            error = e
    if _any_rank(accelerator, error is not None):
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        last_link = root / "last"
        kept = f"`last` still points at {os.readlink(last_link)}" if last_link.is_symlink() else \
            "no earlier checkpoint is kept"
        raise write_error(final, error, what="the checkpoint", after=f"nothing of it was kept and {kept}",
                          error_type=CheckpointError) from None
    if accelerator.is_main_process:
        _publish(tmp, final, root, state, last=last, best=best)
    accelerator.wait_for_everyone()
    return final


def _write_parts(weights: dict, tmp: Path, state: TrainState, cfg: Config, world_size: int) -> None:
    """Rank 0: the weights, config and state (last: it lists the parts) into the temp folder."""
    from safetensors.torch import save_file

    weights = {k: v.detach().float().contiguous().cpu() for k, v in weights.items()}
    save_file(weights, str(tmp / WEIGHTS_NAME))
    os.chmod(tmp / WEIGHTS_NAME, default_file_mode())  # safetensors creates it 0600; its neighbours follow the umask
    (tmp / CONFIG_NAME).write_text(dump_config(cfg))
    state.world_size = world_size
    state.parts = _parts(tmp)
    (tmp / STATE_NAME).write_text(state.to_json())


def _publish(tmp: Path, final: Path, root: Path, state: TrainState, *, last: bool, best: bool) -> None:
    """Rank 0: rename the complete temp folder into place and point last/best at it."""
    if final.exists():  # a step folder of another trajectory: replace it, never reuse it
        os.replace(final, root / f".old-{final.name}")
    os.replace(tmp, final)
    if last:
        _point(root, "last", final)
    if best:
        _point(root, "best", final)
    _collect_garbage(root)
    logger.info("checkpoint step %d -> %s%s%s", state.step, final, " [last]" if last else "",
                " [best]" if best else "")


def _any_rank(accelerator, flag: bool) -> bool:
    """`flag` OR-ed across ranks; also a barrier."""
    t = torch.tensor(float(flag), device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())

"""Checkpoints: atomic, complete, finite, verified on load, and never a pickle from an unknown source.

Layout under runs/<name>/checkpoints/:

    step-000120/              one complete checkpoint (renamed into place only when complete)
      model.safetensors       unwrapped fp32 weights, usable without accelerate
      config.yaml             the resolved config of the run
      state.json              TrainState (step, data position, best metric, log window, ...) and
                              `parts`: every file of the checkpoint with its size
      ...                     accelerate's save_state: optimizer, scheduler, RNG per rank
                              (DeepSpeed: its sharded engine state)
    last -> step-000120       symlink, swapped atomically with os.replace
    best -> step-000100       symlink to the best evaluation so far
    .tmp-step-000140/         an interrupted write; ignored and cleaned at the next save

Guarantees:
- A checkpoint folder appears only when every part is written (temp folder, barrier, rename).
- A model with a non-finite parameter or buffer is never written (`assert_finite`).
- A write that fails (a full disk) raises CheckpointError in one line naming the checkpoint, the
  reason and the free space; its temp folder is removed and `last` keeps pointing at the previous one.
- A checkpoint is complete only with all of its parts: `verify_checkpoint` checks the parts
  listed in state.json against the folder before anything is loaded, and that the RNG state of
  every rank reads back; `find_resume` falls back to an older complete checkpoint, saying why.
- Pickled files are read with `torch.load(weights_only=True)`; a DeepSpeed checkpoint's `.pt`
  files are checked that way (with an allow-list of DeepSpeed's own plain types), symlinked
  folders included, before DeepSpeed, which unpickles them fully, is given the folder; a link
  leading outside the checkpoint folder is refused.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mtlxray.config import Config, dump_config
from mtlxray.errors import CheckpointError, NonFiniteLossError, error_line
from mtlxray.model.base import CONFIG_NAME, WEIGHTS_NAME

__all__ = ["TrainState", "save_checkpoint", "find_resume", "resolve_checkpoint", "read_state",
           "verify_checkpoint", "check_deepspeed_pickles", "assert_finite", "all_finite",
           "load_model_from_checkpoint", "WEIGHTS_NAME", "STATE_NAME", "CONFIG_NAME"]

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
    skipped_shards: int = 0
    """Shards the training loaders skipped over the run, on all ranks (`data.skip_failed_shards`)."""
    phase: str = "phase1"
    world_size: int = 1
    """Processes that wrote the checkpoint (one RNG state file each)."""
    components: dict[str, dict] = field(default_factory=dict)
    """The `state_dict()` of each stateful part of the loop, by name: `loss_window` (the training-log
    interval in progress, so that a resumed run logs exactly what an uninterrupted one would) and
    `nonfinite` (the non-finite steps skipped so far)."""
    parts: dict[str, int] = field(default_factory=dict)
    """Every file of the checkpoint (relative path -> bytes), for `verify_checkpoint`."""

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str, source: str) -> "TrainState":
        try:
            data = json.loads(text)
            if "log_window" in data or "nan_skipped" in data:  # written before `components` held them
                data["components"] = {"loss_window": data.pop("log_window", None) or {"sums": {}, "counts": {}},
                                      "nonfinite": {"skipped": data.pop("nan_skipped", 0)}}
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
    """Remove step dirs that neither `last` nor `best` points to, and stale temp dirs.

    Only finite, complete checkpoints are ever linked, so the newest good one always survives."""
    keep = {(root / link).resolve() for link in ("last", "best") if (root / link).exists()}
    for d in root.iterdir():
        if d.name.startswith((".tmp-", ".old-")) or (d.name.startswith("step-") and d.resolve() not in keep):
            shutil.rmtree(d, ignore_errors=True)


def _zero3_shard(param: torch.Tensor) -> torch.Tensor:
    """This rank's elements of a ZeRO-3 parameter, without the partition's padding.

    DeepSpeed cuts a parameter into equal partitions of ceil(numel / ranks) elements; where the
    last rank's partition runs past the end, the tail is allocated with `torch.empty` and never
    written, so it holds whatever the memory held (a NaN or inf now and then), and is no weight."""
    shard = param.ds_tensor
    start = shard.numel() * torch.distributed.get_rank(param.ds_process_group)
    return shard.narrow(0, 0, max(0, min(shard.numel(), param.ds_numel - start)))


def _finite_tensors(model: torch.nn.Module) -> list[torch.Tensor]:
    # Under ZeRO-3 a parameter's data is empty and this rank's shard is in its `ds_tensor`. Only the
    # buffers a checkpoint holds: a non-persistent one is derived, and may hold -inf by design
    # (open_clip's causal attention mask).
    buffers = [b for m in model.modules() for name, b in m.named_buffers(recurse=False)
               if name not in m._non_persistent_buffers_set]
    tensors = [_zero3_shard(p) if hasattr(p, "ds_tensor") else p for p in model.parameters()] + buffers
    return [t.detach() for t in tensors if t.is_floating_point() and t.numel()]


def all_finite(model: torch.nn.Module) -> torch.Tensor:
    """A 0-d bool tensor (on the model's device): every floating parameter and buffer is finite.

    One fused reduction: the norm of a tensor holding a nan or inf is itself non-finite."""
    tensors = _finite_tensors(model)
    if not tensors:
        return torch.ones((), dtype=torch.bool)
    norms = torch._foreach_norm(tensors)  # one kernel per dtype/device group
    return torch.stack([n.float() for n in norms]).isfinite().all()


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
        raise _write_error(error, final, root) from None
    if accelerator.is_main_process:
        _publish(tmp, final, root, state, last=last, best=best)
    accelerator.wait_for_everyone()
    return final


def _write_parts(weights: dict, tmp: Path, state: TrainState, cfg: Config, world_size: int) -> None:
    """Rank 0: the weights, config and state (last: it lists the parts) into the temp folder."""
    from safetensors.torch import save_file

    from mtlxray.io import default_file_mode

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


def _write_error(error: Optional[Exception], final: Path, root: Path) -> CheckpointError:
    """One line: which checkpoint could not be written, why, the free space there, and what is kept."""
    if error is None:
        why = "another process failed to write its part"
    elif isinstance(error, OSError) and error.errno is not None:
        why = os.strerror(error.errno)
    else:
        text = str(error).strip()  # torch's writer ends its multi-line message with the cause
        why = (text.splitlines()[-1].strip() if text else type(error).__name__)[:200]
    free = shutil.disk_usage(root).free
    last = root / "last"
    kept = f"`last` still points at {os.readlink(last)}" if last.is_symlink() else "no earlier checkpoint is kept"
    return CheckpointError(f"{final}: cannot write the checkpoint ({why}); {free / 2**20:.1f} MiB free on that file "
                           f"system; nothing of it was kept and {kept}")


def read_state(ckpt: Path) -> TrainState:
    path = Path(ckpt) / STATE_NAME
    if not path.is_file():
        raise CheckpointError(f"{ckpt}: not a complete checkpoint (no {STATE_NAME})")
    return TrainState.from_json(path.read_text(), str(path))


def verify_checkpoint(ckpt: Path, *, resumable: bool = True) -> TrainState:
    """The checkpoint's state after checking that it is complete; CheckpointError naming what is not.

    Checks every part listed in state.json is there with its size, and (resumable) that each
    rank's RNG state reads back with weights_only loading."""
    ckpt = Path(ckpt)
    state = read_state(ckpt)
    for required in (WEIGHTS_NAME, CONFIG_NAME):
        if not (ckpt / required).is_file():
            raise CheckpointError(f"{ckpt}: incomplete checkpoint: {required} is missing")
    for rel, size in state.parts.items():
        path = ckpt / rel
        if not path.is_file():
            raise CheckpointError(f"{ckpt}: incomplete checkpoint: {rel} is missing")
        if path.stat().st_size != size:
            raise CheckpointError(f"{ckpt}: corrupt checkpoint: {rel} has {path.stat().st_size} bytes, "
                                  f"{size} were written")
    if resumable:
        from accelerate.utils import load as accelerate_load

        for rank in range(state.world_size):
            rng = ckpt / f"random_states_{rank}.pkl"
            if not rng.is_file():
                raise CheckpointError(f"{ckpt}: incomplete checkpoint: {rng.name} is missing "
                                      "(resume would not be exact)")
            try:
                states = accelerate_load(rng, map_location="cpu")
                missing = {"random_state", "numpy_random_seed", "torch_manual_seed"} - set(states)
            except Exception as e:  # any unpickling failure means the file is unusable
                raise CheckpointError(f"{rng}: unreadable RNG state ({type(e).__name__}: "
                                      f"{error_line(e, default='')})") from None
            if missing:
                raise CheckpointError(f"{rng}: RNG state lacks {sorted(missing)}")
    return state


def find_resume(root: Path) -> Optional[Path]:
    """The newest complete checkpoint under root: `last`, else the newest verified step folder.

    A `last` (or newer folder) that fails verification is skipped with a warning naming why."""
    if not root.is_dir():
        return None
    candidates = []
    last = root / "last"
    if last.exists():
        candidates.append(last.resolve())
    candidates += sorted((d for d in root.glob("step-*") if d.is_dir()), key=lambda d: d.name, reverse=True)
    seen = set()
    for ckpt in candidates:
        if ckpt in seen:
            continue
        seen.add(ckpt)
        try:
            verify_checkpoint(ckpt)
        except CheckpointError as e:
            if (ckpt / STATE_NAME).is_file():
                logger.warning("skipping %s: %s", ckpt.name, e)
            continue
        if ckpt != candidates[0]:
            logger.warning("resuming from %s, the newest complete checkpoint", ckpt.name)
        return ckpt
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint dir from a dir, a `last`/`best` link or a model.safetensors path."""
    p = Path(path)
    if p.is_file() and p.name == WEIGHTS_NAME:
        p = p.parent
    if not p.exists():
        raise CheckpointError(f"{path}: does not exist" + (" (a broken link)" if p.is_symlink() else ""))
    if not (p / WEIGHTS_NAME).is_file():
        raise CheckpointError(f"{path}: no {WEIGHTS_NAME} there (not a checkpoint)")
    return p.resolve()


# DeepSpeed stores a few of its own plain types (enums, small config records) in its .pt files.
_DEEPSPEED_SAFE = (
    "deepspeed.runtime.zero.config.ZeroStageEnum",
    "deepspeed.runtime.fp16.loss_scaler.LossScaler",
    "deepspeed.utils.tensor_fragment.fragment_address",
    "deepspeed.checkpoint.constants",
)


def _deepspeed_safe_globals() -> list:
    import importlib

    found = []
    for dotted in _DEEPSPEED_SAFE:
        module, _, name = dotted.rpartition(".")
        try:
            obj = getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError):
            continue
        if isinstance(obj, type):
            found.append(obj)
    return found


def _deepspeed_pickles(ckpt: Path) -> list[Path]:
    """Every .pt file under `ckpt` as DeepSpeed would reach it, symlinked folders included.

    `Path.rglob` does not descend into a symlinked folder, while DeepSpeed opens the files
    through it; so this walks with links followed, and refuses (CheckpointError) any link that
    leads outside the checkpoint folder: nothing a checkpoint holds may come from elsewhere."""
    root = ckpt.resolve()
    found, seen = [], set()
    for folder, dirs, files in os.walk(root, followlinks=True):
        here = Path(folder)
        real = here.resolve()
        if real in seen:  # a link back to a folder already walked
            dirs[:] = []
            continue
        seen.add(real)
        for name in dirs + files:
            path = here / name
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise CheckpointError(f"{path}: refused: a link to {path.resolve()}, outside the checkpoint "
                                      f"{root}")
        found += [here / name for name in files if name.endswith(".pt")]
    return sorted(found)


def check_deepspeed_pickles(ckpt: Path) -> None:
    """Refuse a DeepSpeed checkpoint whose .pt files need more than weights_only unpickling.

    DeepSpeed loads its files with `torch.load(weights_only=False)`, which runs any code a
    tampered file carries; this reads each one first with `weights_only=True` (plus DeepSpeed's
    own plain types) and raises CheckpointError naming the file on failure."""
    import argparse

    safe = [*_deepspeed_safe_globals(), argparse.Namespace]
    for path in _deepspeed_pickles(Path(ckpt)):
        try:
            with torch.serialization.safe_globals(safe):
                torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:  # UnpicklingError for forbidden globals, others for corrupt files
            raise CheckpointError(f"{path}: refused: not loadable with weights_only=True "
                                  f"({error_line(e)[:200]})") from None


def load_model_from_checkpoint(path: str | Path, map_location: str = "cpu"):
    """(model in eval mode, cfg) from a checkpoint folder or its model.safetensors.

    Fails with one line when the weights are not finite (a collapsed run's last state)."""
    from mtlxray.model.base import MTLModel

    ckpt = resolve_checkpoint(path)
    model = MTLModel.from_pretrained(ckpt, map_location)
    if not bool(all_finite(model)):
        raise CheckpointError(f"{ckpt}: the weights hold nan or inf values (a diverged run); "
                              "use an earlier checkpoint")
    return model, model.config

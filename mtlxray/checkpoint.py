"""The checkpoint folder: its format, and reading it verified, finite, and never a pickle from an unknown source.

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

Training writes the folders (`mtlxray.train.checkpoints`: atomic, finite only, `last`/`best`
rotation); everything else reads them. Guarantees of reading:
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from mtlxray.errors import CheckpointError, error_line
from mtlxray.model.base import CONFIG_NAME, MTLModel, WEIGHTS_NAME

__all__ = ["TrainState", "find_resume", "resolve_checkpoint", "read_state",
           "verify_checkpoint", "check_deepspeed_pickles", "all_finite",
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
    ckpt = resolve_checkpoint(path)
    model = MTLModel.from_pretrained(ckpt, map_location)
    if not bool(all_finite(model)):
        raise CheckpointError(f"{ckpt}: the weights hold nan or inf values (a diverged run); "
                              "use an earlier checkpoint")
    return model, model.config

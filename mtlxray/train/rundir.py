"""The run folder: one writer at a time, and no silent mix of two runs.

- An exclusive `fcntl.flock` on `runs/<name>/.lock`, held by rank 0 for the life of the run. The
  kernel releases it when the holder dies (SIGKILL, node failure of a local disk, a requeued
  Slurm job's old process), so a requeued job gets it back; a second run fails at once with one
  line naming the holder's host and pid. (On network file systems flock must be supported by the
  mount; NFSv4 and Lustre with `flock` do.)
- `--resume none` in a folder that already holds checkpoints or metrics is refused unless
  `--overwrite` is given, which removes the previous run's checkpoints, metrics and TensorBoard
  logs first. A fresh run never reuses or mixes in another run's files.
- A resume continues the run the checkpoint holds: a config that differs from the checkpoint's
  in a field that changes the trajectory (anything outside `RESUMABLE_CHANGES`) is refused in one
  line naming the fields, unless `--allow-config-change` (`config_changes`).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
from pathlib import Path
from typing import Any, Optional

import yaml

from mtlxray.config import Config, config_to_dict
from mtlxray.errors import ConfigError, MtlxError

__all__ = ["RUN_INFO_NAME", "RunLock", "RunBusyError", "previous_run_files", "clear_previous_run", "flatten",
           "config_changes", "RESUMABLE_CHANGES"]

LOCK_NAME = ".lock"
RUN_INFO_NAME = "run.json"
"""How the run trains (device, precision, world size, backend, attention, compile) and what produced it."""
RUN_FILES = ("checkpoints", "metrics.jsonl", "tensorboard", "config.yaml", RUN_INFO_NAME)
"""What a training run writes into its folder (other files, such as submitit logs, are kept)."""


class RunBusyError(MtlxError):
    """Another process holds the run folder."""


class RunLock:
    """An exclusive lock on a run folder, released when closed or when the holder dies."""

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK_NAME
        self._fd: Optional[int] = None

    def acquire(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = self._holder(fd)
            os.close(fd)
            raise RunBusyError(f"{self.path.parent}: run folder in use by {holder}; wait for it, or choose "
                               "another run.name") from None
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"host": socket.gethostname(), "pid": os.getpid(),
                                 "job": os.environ.get("SLURM_JOB_ID")}).encode())
        os.fsync(fd)
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        try:
            info = json.loads(os.pread(fd, 4096, 0) or b"{}")
        except (OSError, ValueError):
            info = {}
        where = f"pid {info.get('pid', '?')} on {info.get('host', '?')}"
        return where + (f" (Slurm job {info['job']})" if info.get("job") else "")

    def release(self) -> None:
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


def previous_run_files(run_dir: Path) -> list[str]:
    """The files of an earlier training run in `run_dir` (empty when the folder is unused)."""
    found = []
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.iterdir()):
        found.append("checkpoints/")
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file() and metrics.stat().st_size > 0:
        found.append("metrics.jsonl")
    return found


def clear_previous_run(run_dir: Path, overwrite: bool) -> None:
    """Refuse (ConfigError) or, with `overwrite`, remove an earlier run's files from `run_dir`."""
    found = previous_run_files(run_dir)
    if not found:
        return
    if not overwrite:
        raise ConfigError(f"{run_dir} already holds a run ({', '.join(found)}): continue it with "
                          "`--resume auto`, replace it with `--resume none --overwrite`, or set another run.name")
    for name in RUN_FILES:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        elif path.exists():
            path.unlink()


RESUMABLE_CHANGES = (
    "schedule.epochs", "schedule.max_steps",  # extend (or shorten) the run
    "run.log_every", "run.eval_every", "run.save_every", "run.tensorboard", "run.progress",  # what is logged
    "run.name", "run.output_dir",  # where the run is
    "data.verify", "data.remote_retries", "data.remote_backoff_s", "data.remote_timeout_s",  # how shards are read
    "phase.init_from", "model.pretrained", "model.encoder_pretrained",  # a resume takes the checkpoint's weights
    "launch",  # the job's resources; a changed process count is refused on its own
)
"""Config keys (or sections) a resume may change: they do not change what the next steps compute."""

_PATH_KEYS = ("data.shards", "run.deepspeed_config", "model.first_stage")
"""Local paths, compared as absolute paths (a URL as written)."""


def flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    """A nested dict as `a.b.c` keys."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _comparable(key: str, value: Any) -> Any:
    if key in _PATH_KEYS and isinstance(value, str) and "://" not in value:
        return os.path.abspath(value)
    return value


def config_changes(cfg: Config, saved_yaml: str) -> dict[str, tuple[Any, Any]]:
    """{key: (trained value, new value)} for every trajectory-changing difference between the resolved
    `cfg` and a checkpoint's config.yaml. Keys only one side has (a config from an older or newer
    mtlxray) are not compared."""
    saved = flatten(yaml.safe_load(saved_yaml) or {})
    new = flatten(config_to_dict(cfg))
    return {k: (saved[k], new[k]) for k in sorted(saved.keys() & new.keys())
            if _comparable(k, saved[k]) != _comparable(k, new[k])
            and not any(k == safe or k.startswith(safe + ".") for safe in RESUMABLE_CHANGES)}


def describe_changes(changes: dict[str, tuple[Any, Any]], most: int = 6) -> str:
    """`key old -> new, ...` on one line, at most `most` keys."""
    def short(v: Any) -> str:
        text = json.dumps(v) if not isinstance(v, str) else v
        return text if len(text) <= 40 else text[:37] + "..."

    items = [f"{k} {short(a)} -> {short(b)}" for k, (a, b) in changes.items()]
    more = f" and {len(items) - most} more" if len(items) > most else ""
    return ", ".join(items[:most]) + more

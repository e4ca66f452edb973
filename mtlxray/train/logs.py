"""What a run reports: metrics.jsonl and tracker lines, device-side loss sums, and progress.

metrics.jsonl holds one strict-JSON object per line (a nan is written as null), rank 0 only:

- training lines (every run.log_every steps): `type`="train", `step` (optimizer steps done),
  `epoch`, `samples` (seen across ranks), `loss` (weighted total), `loss/<task>` (means over the
  interval's finite micro-steps and the ranks), `lr` (optim.lr on the schedule, before
  multipliers), `lr/<group>`, `skipped` (non-finite steps skipped so far), `img_per_s` (all
  ranks), `world_size`, `time` (unix seconds);
- evaluation lines: `type`="eval", `step`, `epoch` and `val/<metric>` for every metric of
  `mtlxray.evaluation` plus `val/loss` and `val/loss/<task>`.

On resume, lines after the checkpoint's step are dropped and the interval in progress is
restored from the checkpoint, so a resumed run's lines equal an uninterrupted run's.

Trackers (`run.tensorboard`, `run.trackers`: tensorboard, mlflow, wandb) are accelerate's own
(`log_with`); they get the same numbers under the same names as metrics.jsonl, and MLflow and
W&B get the resolved config, flattened to dotted keys, as the run's parameters.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from mtlxray.io import json_safe, write_text_atomic

__all__ = ["MetricsLog", "LossWindow", "Progress", "tracker_names", "build_trackers", "start_trackers",
           "mlflow_uri", "config_params"]

logger = logging.getLogger(__name__)


class MetricsLog:
    """Append-only metrics.jsonl (and TensorBoard through the accelerator) written by rank 0."""

    def __init__(self, path: Path, accelerator, trackers: bool) -> None:
        self.path = path
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process
        self.trackers = trackers

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (the resumed run logs them again)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        if self.trackers:
            scalars = {k: v for k, v in record.items() if k not in ("type", "time") and isinstance(v, (int, float))
                       and math.isfinite(v)}
            self.accelerator.log(scalars, step=record["step"])


def tracker_names(run) -> list[str]:
    """The trackers a run logs to (`run.trackers`, plus tensorboard when `run.tensorboard`), in order."""
    names = list(dict.fromkeys([*(["tensorboard"] if run.tensorboard else []), *run.trackers]))
    return names


def mlflow_uri(run) -> str:
    """`run.mlflow_uri`, else a SQLite file in run.output_dir (no server needed)."""
    return run.mlflow_uri or f"sqlite:///{(Path(run.output_dir) / 'mlflow.db').resolve()}"


def build_trackers(cfg, run_dir: Path) -> list:
    """accelerate trackers for `log_with`: TensorBoard in <run>/tensorboard, MLflow, W&B offline.

    Built here rather than named, so that TensorBoard keeps its folder and MLflow and W&B get the
    experiment and run names of `run.experiment` and `run.tracker_run_name`.
    """
    from accelerate.tracking import MLflowTracker, TensorBoardTracker, WandBTracker

    run = cfg.run
    name = run.tracker_run_name or run.name
    trackers = []
    for kind in tracker_names(run):
        if kind == "tensorboard":
            trackers.append(TensorBoardTracker("tensorboard", run_dir))
        elif kind == "mlflow":
            _require("mlflow", "mlflow")
            trackers.append(MLflowTracker(experiment_name=run.experiment or run.name, run_name=name))
        else:
            _require("wandb", "wandb")
            os.environ.setdefault("WANDB_MODE", "offline")  # no account or network needed; `wandb sync` later
            trackers.append(WandBTracker(run.experiment or run.name, name=name, dir=str(run_dir)))
    return trackers


def _require(module: str, tracker: str) -> None:
    import importlib.util

    from mtlxray.errors import ConfigError

    if importlib.util.find_spec(module) is None:
        raise ConfigError(f"run.trackers: {tracker} needs the `{module}` package: pip install 'mtlxray[track]'")


def config_params(cfg) -> dict[str, object]:
    """The resolved config as flat `section.key` parameters (lists and dicts as text)."""
    out: dict[str, object] = {}

    def walk(prefix: str, value: object) -> None:
        if isinstance(value, dict):
            for k, v in value.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            out[prefix] = value if isinstance(value, (int, float, str, bool)) or value is None else json.dumps(value)

    walk("", dataclasses.asdict(cfg))
    return out


def start_trackers(accelerator, cfg) -> None:
    """Start the accelerator's trackers; MLflow and W&B get the config as parameters (main process)."""
    if not accelerator.log_with:
        return
    if accelerator.is_main_process and "mlflow" in tracker_names(cfg.run):
        import mlflow

        mlflow.set_tracking_uri(mlflow_uri(cfg.run))
    accelerator.init_trackers(cfg.run.experiment or cfg.run.name)
    params = config_params(cfg)
    for tracker in accelerator.trackers:
        if tracker.name != "tensorboard":  # TensorBoard's hparams refuse list values; it never had them
            tracker.store_init_configuration(params)


class LossWindow:
    """Sums of the loss parts since the last log line, kept on the device (no host read per step).

    Non-finite values (a skipped step) are left out of the sums and the counts."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums: dict[str, torch.Tensor] = {}
        self.counts: dict[str, torch.Tensor] = {}
        self.samples = 0
        self.t0 = time.perf_counter()

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name, value in values.items():
            v = value.detach().double().reshape(())
            finite = torch.isfinite(v)
            if name not in self.sums:
                self.sums[name] = torch.zeros((), dtype=torch.float64, device=self.device)
                self.counts[name] = torch.zeros((), dtype=torch.float64, device=self.device)
            self.sums[name] += torch.where(finite, v, 0.0)
            self.counts[name] += finite.double()

    def sync_values(self) -> tuple[list[str], list[torch.Tensor]]:
        """(names, [sum, count per name]) in a fixed order, for one all-reduce at the log step."""
        names = sorted(self.sums)
        return names, [t for n in names for t in (self.sums[n], self.counts[n])]

    @staticmethod
    def means(names: list[str], values: list[float]) -> dict[str, float]:
        return {n: values[2 * i] / values[2 * i + 1] if values[2 * i + 1] > 0 else math.nan
                for i, n in enumerate(names)}

    def state(self) -> dict:
        """The interval in progress as plain numbers (read at a save, which is a sync point anyway)."""
        return {"sums": {n: t.item() for n, t in self.sums.items()},
                "counts": {n: t.item() for n, t in self.counts.items()}}

    def restore(self, state: dict) -> None:
        for name, value in state.get("sums", {}).items():
            self.sums[name] = torch.tensor(value, dtype=torch.float64, device=self.device)
            self.counts[name] = torch.tensor(state["counts"][name], dtype=torch.float64, device=self.device)

    def reset(self) -> None:
        self.sums, self.counts, self.samples, self.t0 = {}, {}, 0, time.perf_counter()


class Progress:
    """A tqdm bar when stderr is a terminal; otherwise one log line per log step (batch logs stay clean)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool) -> None:
        self.total, self.step, self.desc = total, initial, desc
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, dynamic_ncols=True)

    def update(self, step: int) -> None:
        if self.bar is not None:
            self.bar.update(step - self.step)
        self.step = step

    def report(self, record: dict) -> None:
        """Show a training log line's loss (bar postfix, or a log line when there is no bar)."""
        if not self.enabled:
            return
        loss = record.get("loss", math.nan)
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{loss:.4f}", refresh=False)
        else:
            logger.info("%s: step %d/%d (%.0f%%), loss %.4f, %.1f img/s", self.desc, record["step"], self.total,
                        100.0 * record["step"] / max(1, self.total), loss, record.get("img_per_s", math.nan))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None

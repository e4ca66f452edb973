"""What a run reports: metrics.jsonl and tracker lines, device-side loss sums, and progress.

metrics.jsonl holds one strict-JSON object per line (a nan is written as null), rank 0 only:

- training lines (every run.log_every steps): `type`="train", `step` (optimizer steps done),
  `total_steps` (the steps the run trains in all), `epoch`, `samples` (seen across ranks), `loss`
  (weighted total), `loss/<task>` (means over the interval's finite micro-steps and the ranks),
  `lr` (optim.lr on the schedule, before multipliers), `lr/<group>`, `skipped` (non-finite steps
  skipped so far), `skipped_shards` (shards skipped by `data.skip_failed_shards` so far in the run,
  all ranks and sources; kept in the checkpoint), `img_per_s` (all ranks), `world_size`, `time` (unix seconds);
- evaluation lines: `type`="eval", `step`, `epoch` and `val/<metric>` for every metric of
  `mtlxray.eval.records` plus `val/loss` and `val/loss/<task>`.

On resume, lines after the checkpoint's step are dropped and the interval in progress is
restored from the checkpoint, so a resumed run's lines equal an uninterrupted run's.

Trackers (`run.tensorboard`, `run.trackers`: tensorboard, mlflow, wandb) are accelerate's own
(`log_with`); they get the same numbers under the same names as metrics.jsonl, and MLflow and
W&B get the resolved config, flattened to dotted keys, as the run's parameters. TensorBoard also
shows the config and the start-up line as text, and at each evaluation a few validation images
(`val/overlays`: image | true masks | predicted masks, `mtlxray.train.validation.VAL_OVERLAYS`).
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

from mtlxray.errors import ConfigError
from mtlxray.io import json_safe, write_text_atomic
from mtlxray.provenance import provenance

__all__ = ["MetricsLog", "LossWindow", "Progress", "format_duration", "run_info", "run_info_line", "tracker_names",
           "build_trackers", "start_trackers", "mlflow_uri", "config_params"]

logger = logging.getLogger(__name__)


def run_info(cfg, accelerator, model, precision_source: str) -> dict:
    """How this run trains, as decided at start-up, with what produced it (`mtlxray.provenance`):
    device, precision (and what chose it), world size, backend, attention kernel and compile."""
    import torch.distributed as dist

    device = accelerator.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"{torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads"
    kernel = getattr(model, "attention_kernel", None)
    return {"device": f"{device.type} ({name})", "precision": cfg.run.precision, "precision_source": precision_source,
            "world_size": accelerator.num_processes,
            "backend": f"{cfg.run.backend}/{dist.get_backend() if dist.is_initialized() else 'single process'}",
            "attention": kernel or "none (no window attention)", "compile": bool(cfg.run.compile),
            **provenance(cfg)}


def run_info_line(info: dict) -> str:
    """The one start-up line: `device cpu (AVX512, 2 threads), precision fp32 (run.precision), ...`."""
    return (f"device {info['device']}, precision {info['precision']} ({info['precision_source']}), "
            f"world size {info['world_size']}, backend {info['backend']}, attention {info['attention']}, "
            f"compile {'on' if info['compile'] else 'off'}")


TENSORBOARD_LEFT_OUT = ("type", "time", "step", "total_steps", "epoch", "world_size")
"""Record fields that are not curves: the step is TensorBoard's x axis; epoch, total steps and world
size are counters and constants (metrics.jsonl keeps them; the start-up text names the world size)."""


def tracker_scalars(record: dict, left_out: tuple[str, ...] = ("type", "time", "total_steps")) -> dict[str, float]:
    """A metrics.jsonl record's finite numbers, under their metrics.jsonl names (MLflow, W&B),
    without the fields in `left_out`."""
    return {k: v for k, v in record.items() if k not in left_out
            and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def tensorboard_scalars(record: dict) -> dict[str, float]:
    """A metrics.jsonl record as TensorBoard scalars: training values under `train/`, validation
    values under their own `val/`; non-finite values left out."""
    prefix = "" if record.get("type") == "eval" else "train/"
    return {(k if k.startswith("val/") else prefix + k): v
            for k, v in tracker_scalars(record, TENSORBOARD_LEFT_OUT).items()}


class MetricsLog:
    """Append-only metrics.jsonl, and the run's trackers (TensorBoard, MLflow, W&B), written by rank 0."""

    def __init__(self, path: Path, accelerator) -> None:
        self.path = path
        self.accelerator = accelerator
        self.enabled = accelerator.is_main_process

    def truncate_after(self, step: int) -> int:
        """Drop lines logged after `step` (the resumed run logs them again); returns how many."""
        if not (self.enabled and self.path.is_file()):
            return 0
        lines = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [line for line in lines if json.loads(line).get("step", 0) <= step]
        if len(kept) < len(lines):
            write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return len(lines) - len(kept)

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(json_safe(record), allow_nan=False) + "\n")
        if self.enabled:
            # TensorBoard groups its panels by prefix (train/, val/); MLflow and W&B get the names of
            # metrics.jsonl, so a run's numbers read the same in every tool.
            for tracker in self.accelerator.trackers:
                scalars = tensorboard_scalars(record) if tracker.name == "tensorboard" else tracker_scalars(record)
                tracker.log(scalars, step=record["step"])

    def write_text(self, texts: dict[str, str], step: int = 0) -> None:
        """Text panels in TensorBoard (the resolved config, the start-up line), shown as Markdown."""
        if not self.enabled:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                # four spaces: a Markdown code block, so YAML keeps its indentation
                tracker.log({k: "\n".join("    " + line for line in v.splitlines()) for k, v in texts.items()},
                            step=step)


    def write_images(self, images: dict, step: int) -> None:
        """Image panels in TensorBoard: H×W×3 uint8 arrays (None: nothing to show)."""
        if not self.enabled:
            return
        for tracker in self.accelerator.trackers:
            if tracker.name == "tensorboard":
                tracker.log_images({k: v[None] for k, v in images.items() if v is not None}, step=step,
                                   dataformats="NHWC")


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

    def state_dict(self) -> dict:
        """The interval in progress as plain numbers (read at a save, which is a sync point anyway)."""
        return {"sums": {n: t.item() for n, t in self.sums.items()},
                "counts": {n: t.item() for n, t in self.counts.items()}}

    def load_state_dict(self, state: dict) -> None:
        """Continue the interval of `state_dict()`: a resumed run logs what an uninterrupted one would."""
        self.sums = {n: torch.tensor(v, dtype=torch.float64, device=self.device) for n, v in state["sums"].items()}
        self.counts = {n: torch.tensor(state["counts"][n], dtype=torch.float64, device=self.device)
                       for n in state["sums"]}

    def reset(self) -> None:
        self.sums, self.counts, self.samples, self.t0 = {}, {}, 0, time.perf_counter()


def format_duration(seconds: float) -> str:
    """`1:02:03` (h:mm:ss), `--` when unknown."""
    if not math.isfinite(seconds) or seconds < 0:
        return "--"
    s = int(round(seconds))
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class Progress:
    """A tqdm bar (with its elapsed time and ETA) when stderr is a terminal; otherwise one log line
    per log step with the elapsed time and an ETA from the steps done so far (batch logs stay clean)."""

    def __init__(self, total: int, initial: int, desc: str, enabled: bool, clock=time.monotonic) -> None:
        self.total, self.step, self.desc = total, initial, desc
        self.enabled = enabled
        self.clock = clock
        self.t0, self.step0 = clock(), initial  # a resumed run's rate counts only this process's steps
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
            elapsed, done = self.clock() - self.t0, record["step"] - self.step0
            eta = elapsed / done * (self.total - record["step"]) if done > 0 else math.nan
            logger.info("%s: step %d/%d (%.0f%%), loss %.4f, %.1f img/s, elapsed %s, ETA %s", self.desc,
                        record["step"], self.total, 100.0 * record["step"] / max(1, self.total), loss,
                        record.get("img_per_s", math.nan), format_duration(elapsed), format_duration(eta))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> "Progress":
        return self

    def __exit__(self, *exc) -> Optional[bool]:
        self.close()
        return None

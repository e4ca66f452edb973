"""The training loop shared by both phases, on Accelerate (DDP) or DeepSpeed.

Outputs under runs/<name>/ (cfg.run.output_dir / cfg.run.name):

- `config.yaml`: the resolved config.
- `metrics.jsonl`: one JSON object per line, rank 0 only. Keys:
  - training lines (every run.log_every steps): `type`="train", `step` (optimizer steps done),
    `epoch`, `samples` (seen across ranks), `loss` (weighted total), `loss/lung`, `loss/inf`
    (phase 2), `loss/cls` (means over the interval and the ranks), `lr` (optim.lr on the schedule,
    before multipliers), `lr/<group>` (each parameter group's rate),
    `img_per_s` (all ranks), `world_size`, `time` (unix seconds);
  - evaluation lines: `type`="eval", `step`, `epoch`, `val/loss`, `val/loss/<task>`,
    `val/lung_dice`, `val/lung_iou` (mean over images) and their `_global` forms (pooled counts),
    `val/inf_dice`, `val/inf_iou` (COVID-19 images only, phase 2), `val/accuracy`,
    `val/macro_f1`, `val/precision/<class>`, `val/recall/<class>`, `val/n_images`.
  On resume, lines after the checkpoint's step are dropped, so each step appears once.
- `tensorboard/`: the same scalars through accelerate's tensorboard tracker.
- `checkpoints/`: see mtlxray.checkpoint.
"""

from __future__ import annotations

import gc
import json
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
from tqdm.auto import tqdm

from mtlxray import CLASS_NAMES
from mtlxray.config import Config, dump_config
from mtlxray.data.loader import (batch_to_device, build_eval_loader, build_train_loader, read_manifest,
                                 shard_urls, train_batches_per_epoch)
from mtlxray.errors import EXIT_REQUEUE, CheckpointError, ConfigError, DataError, ShardError
from mtlxray.hardware import resolve_precision
from mtlxray import metrics as M
from mtlxray.checkpoint import (TrainState, find_resume, load_model_weights, read_state,
                                      resolve_checkpoint, save_checkpoint)
from mtlxray.train.distributed import build_accelerator, deepspeed_config
from mtlxray.train.losses import multitask_loss
from mtlxray.train.optim import build_optimizer, build_scheduler
from mtlxray.train.phases import prepare_phase
from mtlxray.train.signals import NonFiniteGuard, StopFlag, agree

__all__ = ["Trainer", "preflight", "resume_target"]

logger = logging.getLogger(__name__)

COVID = CLASS_NAMES.index("COVID-19")


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _iter_keeping_rng(loader):
    """Iterate `loader` without touching the global torch RNG.

    A DataLoader draws its workers' base seed from the global RNG, and an in-process pipeline may
    draw when it starts. A resumed run starts its loader at a different point than an
    uninterrupted one, so such draws would shift every later random number of the model
    (stochastic depth) and break exact resume. The data pipeline seeds itself.
    """
    with torch.random.fork_rng(devices=[]):
        it = iter(loader)
    while True:
        with torch.random.fork_rng(devices=[]):
            batch = next(it, None)
        if batch is None:
            return
        yield batch


def resume_target(cfg: Config, resume: str) -> Optional[Path]:
    """The checkpoint to continue from: `none`, `auto` (newest complete in the run) or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_resume(Path(cfg.run.output_dir) / cfg.run.name / "checkpoints")
    return resolve_checkpoint(resume)


def preflight(cfg: Config, resume_from: Optional[Path]) -> None:
    """Cheap checks that fail in well under a second with a one-line reason, before any worker."""
    root = Path(cfg.data.shards)
    manifest = read_manifest(root)
    subsets = (cfg.data.subset,) if cfg.data.subset in ("lung", "infection") else ("lung", "infection")
    for subset in subsets:
        if not shard_urls(root, manifest, subset, cfg.data.train_split):
            raise ShardError(f"data.shards: {root} has no {subset}/{cfg.data.train_split} shards")
    if manifest.get("image_size") != cfg.model.img_size:
        raise ConfigError(f"model.img_size={cfg.model.img_size} but the shards in {root} hold "
                          f"{manifest.get('image_size')}² images")
    if cfg.run.backend == "deepspeed":
        deepspeed_config(cfg)
    if cfg.phase.init_from and resume_from is None:
        try:
            resolve_checkpoint(cfg.phase.init_from)
        except CheckpointError as e:
            raise CheckpointError(f"phase.init_from: {e} (train the previous phase first)") from None


class JsonlLog:
    """Append-only metrics.jsonl written by rank 0."""

    def __init__(self, path: Path, enabled: bool) -> None:
        self.path = path
        self.enabled = enabled

    def truncate_after(self, step: int) -> None:
        """Drop lines logged after `step` (they will be logged again by the resumed run)."""
        if not (self.enabled and self.path.is_file()):
            return
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line).get("step", 0) <= step]
        _write_atomic(self.path, "".join(line + "\n" for line in kept))

    def write(self, record: dict) -> None:
        if self.enabled:
            with self.path.open("a") as f:
                f.write(json.dumps(record) + "\n")


class Trainer:
    """One phase of training: build everything from the config, `fit()`, then `close()`."""

    def __init__(self, cfg: Config, resume: str = "auto") -> None:
        from accelerate.utils import broadcast_object_list, set_seed

        from mtlxray.model import build_model

        cfg.run.precision = resolve_precision(cfg.run.precision, "cuda" if torch.cuda.is_available() else "cpu")
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.ckpt_root = self.run_dir / "checkpoints"
        target = [resume_target(cfg, resume)]
        preflight(cfg, target[0])
        self.accelerator = acc = build_accelerator(cfg, self.run_dir)
        if not acc.is_main_process:
            logging.getLogger("mtlxray").setLevel(logging.WARNING)
        broadcast_object_list(target)  # rank 0 decides where to resume from
        self.world = acc.num_processes
        self.rank = acc.process_index
        set_seed(cfg.run.seed)

        model = build_model(cfg.model)
        if cfg.phase.init_from and target[0] is None:
            load_model_weights(model, cfg.phase.init_from)
            logger.info("initialised from %s", cfg.phase.init_from)
        prepare_phase(model, cfg.phase)
        optimizer = build_optimizer(model, cfg)
        batches = train_batches_per_epoch(cfg.data, self.world)
        self.steps_per_epoch = batches // cfg.optim.grad_accum
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data: {batches} batches per rank per epoch is fewer than "
                              f"optim.grad_accum={cfg.optim.grad_accum}")
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.steps_per_epoch
        scheduler = build_scheduler(optimizer, cfg, self.total_steps)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.group_names = [g.get("name", str(i)) for i, g in enumerate(self.optimizer.param_groups)]

        self.state = TrainState(phase=cfg.phase.name)
        self.log = JsonlLog(self.run_dir / "metrics.jsonl", acc.is_main_process)
        if target[0] is not None:
            self._load(Path(target[0]))
        if acc.is_main_process:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.run_dir / "config.yaml", dump_config(cfg))
        if cfg.run.tensorboard:
            acc.init_trackers("tensorboard")
        self._saved_step = self._evaluated_step = self.state.step if target[0] is not None else -1
        self.guard = NonFiniteGuard(cfg.run.nan_skip_budget, self.state.nan_skipped)
        self.stop = StopFlag()
        self._window = {"n": 0, "samples": 0, "t0": time.perf_counter()}
        self._sums: dict[str, float] = {}
        logger.info("world size %d, %d steps per epoch, %d steps in all, starting at step %d",
                    self.world, self.steps_per_epoch, self.total_steps, self.state.step)

    # ---------------------------------------------------------------------------------------------
    # state

    def _load(self, ckpt: Path) -> None:
        state = read_state(ckpt)
        if state.phase != self.cfg.phase.name:
            raise CheckpointError(f"{ckpt}: a {state.phase} checkpoint cannot resume {self.cfg.phase.name}")
        self.accelerator.load_state(str(ckpt))
        self.state = state
        self.log.truncate_after(state.step)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, state.step, state.epoch,
                    state.batch_in_epoch)

    def _save(self, *, last: bool, best: bool) -> None:
        self.state.nan_skipped = self.guard.skipped
        save_checkpoint(self.accelerator, self.model, self.ckpt_root, self.state, self.cfg, last=last, best=best)
        self._saved_step = self.state.step

    # ---------------------------------------------------------------------------------------------
    # loop

    def fit(self) -> int:
        """Train to the planned step count; 0 when done, EXIT_REQUEUE after a signal-triggered save."""
        acc = self.accelerator
        if self.state.step >= self.total_steps:
            logger.info("nothing to do: step %d of %d already reached", self.state.step, self.total_steps)
            return 0
        bar = tqdm(total=self.total_steps, initial=self.state.step, desc=self.cfg.run.name,
                   disable=not (acc.is_main_process and self.cfg.run.progress), dynamic_ncols=True)
        try:
            while self.state.step < self.total_steps:
                if self._train_epoch(bar):
                    logger.warning("stopping at step %d on %s; exit %d for requeue", self.state.step,
                                   self.stop.requested or "a peer's signal", EXIT_REQUEUE)
                    if self._saved_step != self.state.step:
                        self._save(last=True, best=False)
                    return EXIT_REQUEUE
            if self._evaluated_step != self.state.step:
                self._eval_and_maybe_best(save_last=self._saved_step != self.state.step)
            elif self._saved_step != self.state.step:
                self._save(last=True, best=False)
            return 0
        finally:
            bar.close()

    def _batches(self):
        """This rank's batches from the current data position to the end of the epoch."""
        s = self.state
        loader = build_train_loader(self.cfg.data, seed=self.cfg.run.seed, epoch=s.epoch, rank=self.rank,
                                    world_size=self.world, start_batch=s.batch_in_epoch)
        return _iter_keeping_rng(loader)

    def _to_device(self, batch: dict) -> dict:
        return batch_to_device(batch, self.accelerator.device)

    def _train_epoch(self, bar) -> bool:
        """Consume the rest of the epoch (whole accumulation windows); True if asked to stop."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        per_epoch = self.steps_per_epoch * cfg.optim.grad_accum
        it = self._batches()
        self.model.train()
        while s.batch_in_epoch < per_epoch and s.step < self.total_steps:
            try:
                batch = self._to_device(next(it))
            except StopIteration:
                raise DataError(f"data: the loader ended after {s.batch_in_epoch} of {per_epoch} batches "
                                f"in epoch {s.epoch} on rank {self.rank}") from None
            stop = self._micro_step(batch)
            s.batch_in_epoch += 1
            s.samples_seen += batch["img"].shape[0] * self.world
            self._window["samples"] += batch["img"].shape[0] * self.world
            if not acc.sync_gradients:
                continue
            s.step += 1
            bar.update(1)
            epoch_end = s.batch_in_epoch >= per_epoch
            if epoch_end:
                s.epoch += 1
                s.batch_in_epoch = 0
            self._after_step(bar, epoch_end)
            if stop:
                return True
            if epoch_end:
                break
        return False

    def _micro_step(self, batch: dict) -> bool:
        """Forward/backward of one batch (optimizer step at accumulation boundaries); returns stop."""
        acc, cfg = self.accelerator, self.cfg
        with acc.accumulate(self.model):
            out = self.model(batch["img"])
            loss, parts = multitask_loss(out, batch, cfg.phase.loss_weights, cfg.phase.infection_classes)
            nonfinite, stop = agree(acc, not bool(torch.isfinite(loss.detach())),
                                    self.stop.requested is not None)
            if nonfinite:
                self.guard.skip(self.state.step + 1, {"loss": loss.item(), **{k: v.item() for k, v in parts.items()}})
                self.optimizer.zero_grad(set_to_none=True)
            else:
                acc.backward(loss)
                if acc.sync_gradients and cfg.optim.grad_clip > 0:
                    acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
                self._accumulate({"loss": loss.detach(), **{f"loss/{k}": v.detach() for k, v in parts.items()}})
            if acc.sync_gradients:
                self.scheduler.step()
        return stop

    def _accumulate(self, values: dict[str, torch.Tensor]) -> None:
        for k, v in values.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._window["n"] += 1

    def _after_step(self, bar, epoch_end: bool) -> None:
        cfg, s = self.cfg, self.state
        if s.step % cfg.run.log_every == 0 or s.step == self.total_steps:
            self._log_train(bar)
        done = s.step >= self.total_steps
        eval_due = (cfg.run.eval_every > 0 and s.step % cfg.run.eval_every == 0) or \
                   (cfg.run.eval_every == 0 and epoch_end) or done
        save_due = (s.step % cfg.run.save_every == 0) or epoch_end or done
        if eval_due:
            self._eval_and_maybe_best(save_last=save_due)
        elif save_due:
            self._save(last=True, best=False)

    def _log_train(self, bar) -> None:
        acc, w = self.accelerator, self._window
        keys = sorted(self._sums)
        local = torch.tensor([self._sums[k] / max(1, w["n"]) for k in keys] + [float(w["n"] > 0)],
                             dtype=torch.float64, device=acc.device)
        if self.world > 1:
            torch.distributed.all_reduce(local)
        n_ranks = max(1.0, local[-1].item())
        elapsed = max(1e-9, time.perf_counter() - w["t0"])
        record = {"type": "train", "step": self.state.step, "epoch": self.state.epoch,
                  "samples": self.state.samples_seen}
        record.update({k: local[i].item() / n_ranks for i, k in enumerate(keys)})
        groups = self.optimizer.param_groups
        lrs = [g["lr"] for g in groups]
        record["lr"] = groups[0]["lr"] / groups[0].get("lr_mult", 1.0)
        record.update({f"lr/{n}": lr for n, lr in zip(self.group_names, lrs)})
        record.update({"img_per_s": w["samples"] / elapsed, "world_size": self.world, "time": time.time()})
        self.log.write(record)
        if self.cfg.run.tensorboard:
            acc.log({k: v for k, v in record.items() if k not in ("type", "time")}, step=self.state.step)
        bar.set_postfix(loss=f"{record.get('loss', math.nan):.4f}", refresh=False)
        self._sums.clear()
        self._window = {"n": 0, "samples": 0, "t0": time.perf_counter()}

    # ---------------------------------------------------------------------------------------------
    # evaluation

    def _eval_and_maybe_best(self, save_last: bool) -> None:
        cfg, s = self.cfg, self.state
        values = self.evaluate()
        self._evaluated_step = s.step
        self.log.write({"type": "eval", "step": s.step, "epoch": s.epoch, **values})
        if cfg.run.tensorboard:
            self.accelerator.log(values, step=s.step)
        if cfg.run.best_metric not in values:
            raise ConfigError(f"run.best_metric: `{cfg.run.best_metric}` is not an evaluation metric "
                              f"of {cfg.phase.name}; choose one of {', '.join(sorted(values))}")
        value = values[cfg.run.best_metric]
        better = not math.isnan(value) and (
            s.best_metric is None or (value > s.best_metric if cfg.run.best_mode == "max" else value < s.best_metric))
        if better:
            s.best_metric, s.best_step = value, s.step
        logger.info("step %d: %s", s.step, ", ".join(
            f"{k}={values[k]:.4f}" for k in ("val/loss", "val/lung_dice", "val/inf_dice", "val/accuracy",
                                              "val/macro_f1") if k in values))
        if better or save_last:
            self._save(last=save_last, best=better)

    def _eval_subset(self) -> str:
        return self.cfg.data.subset if self.cfg.data.subset in ("lung", "infection") else "infection"

    @torch.no_grad()
    def evaluate(self) -> dict[str, float]:
        """Validation metrics over cfg.data.val_split, gathered across ranks.

        Ranks may hold unequal numbers of batches; they step in lockstep (a rank that ran out
        repeats its last batch and discards the result) so that ZeRO-3's collectives line up.
        """
        from accelerate.utils import gather_object

        acc, cfg = self.accelerator, self.cfg
        loader = build_eval_loader(cfg.data, subset=self._eval_subset(), split=cfg.data.val_split,
                                   rank=self.rank, world_size=self.world)
        self.model.eval()
        rows: dict[str, list[torch.Tensor]] = {"lung": [], "inf": [], "pred": [], "label": []}
        loss_sums: dict[str, float] = {}
        n_local = 0
        it, last = _iter_keeping_rng(loader), None
        while True:
            batch = next(it, None)
            if not agree(acc, batch is not None)[0]:
                break
            if batch is None and last is None:
                last = self._blank_batch()
            batch = self._to_device(batch) if batch is not None else None
            out = self.model((batch or last)["img"])
            if batch is None:
                continue
            last = batch
            self._eval_rows(out, batch, rows)
            n = batch["img"].shape[0]
            loss, parts = multitask_loss(out, batch, cfg.phase.loss_weights, cfg.phase.infection_classes)
            for k, v in {"val/loss": loss, **{f"val/loss/{t}": p for t, p in parts.items()}}.items():
                loss_sums[k] = loss_sums.get(k, 0.0) + float(v) * n
            n_local += n
        self.model.train()
        gathered = gather_object([({k: torch.cat(v) if v else None for k, v in rows.items()}, loss_sums, n_local)])
        return self._summarise(gathered)

    def _blank_batch(self) -> dict:
        size = self.cfg.model.img_size
        zeros = torch.zeros(1, 1, size, size, device=self.accelerator.device)
        return {"img": zeros}

    @staticmethod
    def _eval_rows(out: dict, batch: dict, rows: dict) -> None:
        rows["lung"].append(M.seg_counts(out["lung"].float() > 0, batch["lung"] > 0.5).cpu())
        if out.get("inf") is not None:
            covid = (batch["label"] == COVID) & batch["has_inf"].bool()
            rows["inf"].append(M.seg_counts(out["inf"][covid].float() > 0, batch["inf"][covid] > 0.5).cpu())
        rows["pred"].append(out["cls"].argmax(1).cpu())
        rows["label"].append(batch["label"].cpu())

    def _summarise(self, gathered: list) -> dict[str, float]:
        n = sum(g[2] for g in gathered)
        values: dict[str, float] = {"val/n_images": float(n)}
        for key in gathered[0][1] if gathered else []:
            values[key] = sum(g[1].get(key, 0.0) for g in gathered) / max(1, n)

        def cat(name: str) -> Optional[torch.Tensor]:
            parts = [g[0][name] for g in gathered if g[0][name] is not None]
            return torch.cat(parts) if parts else None

        for task in ("lung", "inf"):
            counts = cat(task)
            if counts is None:
                continue
            summary = M.seg_summary(counts, f"{task}_")
            for metric in ("dice", "iou"):
                for suffix in ("", "_global"):
                    values[f"val/{task}_{metric}{suffix}"] = summary[f"{task}_{metric}{suffix}"]
        pred, label = cat("pred"), cat("label")
        if pred is not None:
            cls = M.classification_summary(M.confusion_matrix(pred, label, len(CLASS_NAMES)), CLASS_NAMES)
            values["val/accuracy"] = cls["accuracy"]
            values["val/macro_f1"] = cls["f1_macro"]
            for name in CLASS_NAMES:
                values[f"val/precision/{name}"] = cls[f"precision/{name}"]
                values[f"val/recall/{name}"] = cls[f"recall/{name}"]
        return values

    # ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """End trackers, restore signal handlers, and shut the process group down cleanly."""
        self.stop.close()
        self.accelerator.end_training()
        # gloo threads freeing tensors during interpreter exit can SIGABRT (pytorch#190489).
        gc.collect()
        time.sleep(0.5)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()

"""The training loop shared by every phase, on Accelerate (DDP) or DeepSpeed.

`Trainer` owns the loop and nothing else; the run folder (`rundir`), what is logged (`logs`),
validation (`validation`, through `mtlxray.eval.records`), non-finite steps (`nonfinite`) and
checkpoint files (`mtlxray.train.checkpoints`) are components it calls.

Host synchronisation: a training step on the DDP backend reads nothing back from the device.
Loss parts, skipped-step counts and the stop flag stay on the device and are read once per
log step (`run.log_every`), in one all-reduce and one copy; that is also where a preemption
signal is acted on. Validation and checkpoint saves synchronise as they must. DeepSpeed adds one
read per micro-step (its engine steps inside backward, so a non-finite loss is caught before it).

Outputs under runs/<name>/: `config.yaml` (headed by the start-up line), `run.json` (device, precision,
world size, backend, attention, compile, versions, config hash), `metrics.jsonl` and `tensorboard/` (see
`mtlxray.train.logs`), `checkpoints/` (see `mtlxray.checkpoint`).
"""

from __future__ import annotations

import gc
import logging
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch

from mtlxray.checkpoint import (WEIGHTS_NAME, TrainState, check_deepspeed_pickles, find_resume, resolve_checkpoint,
                                verify_checkpoint)
from mtlxray.config import Config, dump_config
from mtlxray.data.loader import batch_to_device, build_train_loader
from mtlxray.dist import resolve_world
from mtlxray.errors import EXIT_REQUEUE, CheckpointError, ConfigError, DataError
from mtlxray.eval.gate import Gate
from mtlxray.hardware import resolve_attention
from mtlxray.io import write_json_atomic, write_text_atomic
from mtlxray.model import build_model
from mtlxray.model.base import read_weights
from mtlxray.model.pretrained import load_state_dict_transfer
from mtlxray.preflight import check_run, raise_first
from mtlxray.train.accelerator import build_accelerator, deepspeed_config, keep_grads_in_parameter_layout
from mtlxray.train.checkpoints import save_checkpoint
from mtlxray.train.compiled import compile_loss
from mtlxray.train.logs import (LossWindow, MetricsLog, Progress, run_info, run_info_line, start_trackers,
                                tracker_names)
from mtlxray.train.losses import phase_loss
from mtlxray.train.multisource import IdleParameters, batches_per_epoch, source_batches
from mtlxray.train.nonfinite import NonFiniteGuard
from mtlxray.train.optim import build_optimizer, build_scheduler
from mtlxray.train.phases import prepare_phase
from mtlxray.train.resolve import replay_workers, resolve
from mtlxray.train.rundir import RUN_INFO_NAME, RunLock, clear_previous_run, config_changes, describe_changes
from mtlxray.train.signals import StopFlag, agree
from mtlxray.train.teacher_forcing import PositiveSelector
from mtlxray.train.validation import VAL_OVERLAYS, Validator, iterate_keeping_rng

__all__ = ["Trainer", "preflight", "resume_target"]

logger = logging.getLogger(__name__)


def resume_target(cfg: Config, resume: str) -> Optional[Path]:
    """The checkpoint to continue from: `none`, `auto` (newest complete in the run) or a path."""
    if resume == "none":
        return None
    if resume == "auto":
        return find_resume(Path(cfg.run.output_dir) / cfg.run.name / "checkpoints")
    return resolve_checkpoint(resume)


def _check_same_run(cfg: Config, ckpt: Path, allow: bool) -> None:
    """Refuse (ConfigError, one line) to resume `ckpt` with a config that would train differently."""
    saved = ckpt / "config.yaml"
    if not saved.is_file():
        return  # verify_checkpoint names the missing part
    changes = config_changes(cfg, saved.read_text())
    if not changes:
        return
    if allow:
        logger.warning("resuming %s with a changed config (--allow-config-change): %s", ckpt, describe_changes(changes))
        return
    raise ConfigError(f"{ckpt} was trained with another config: {describe_changes(changes)}; resume with the "
                      "run's values, start another run (another run.name, or --resume none --overwrite), or "
                      "continue with the new values with --allow-config-change")


def preflight(cfg: Config, resume_from: Optional[Path]) -> None:
    """Cheap checks that fail in well under a second with a one-line reason, before any worker:
    the first problem `mtlxray.preflight.check_run` finds, then the DeepSpeed config."""
    raise_first(check_run(cfg, resume_from=resume_from))
    if cfg.run.backend == "deepspeed":
        deepspeed_config(cfg)


class Trainer:
    """One phase of training: build everything from the config, `fit()`, then `close()`."""

    def __init__(self, cfg: Config, resume: str = "auto", overwrite: bool = False,
                 allow_config_change: bool = False) -> None:
        from accelerate.utils import broadcast_object_list, set_seed

        self.stop = StopFlag.install()  # before anything slow: a signal now is recorded, not fatal
        workers = cfg.data.workers
        cfg, precision_source = resolve(cfg, os.environ, resolve_world())  # a copy: the caller's is left as it was
        self.cfg = cfg
        self.run_dir = Path(cfg.run.output_dir) / cfg.run.name
        self.ckpt_root = self.run_dir / "checkpoints"
        if resume == "none" and not overwrite:
            clear_previous_run(self.run_dir, overwrite=False)  # refuses a used folder, before any work
        target = resume_target(cfg, resume)
        if target is not None:
            if workers == "auto":
                replay_workers(cfg, target)
            _check_same_run(cfg, target, allow_config_change)
        preflight(cfg, target)
        self.accelerator = acc = build_accelerator(cfg, self.run_dir)
        if acc.device.type == "cuda":
            # Every step has the same shapes, so cuDNN's per-shape search for the decoders'
            # convolutions pays off after the first step.
            torch.backends.cudnn.benchmark = True
        if not acc.is_main_process:
            logging.getLogger("mtlxray").setLevel(logging.WARNING)
        self.world, self.rank = acc.num_processes, acc.process_index
        self.lock = RunLock(self.run_dir)
        # Rank 0 takes the lock and tidies the folder, then tells the others where to resume.
        decision: list = [None, str(target) if target else None]
        if acc.is_main_process:
            try:
                self.lock.acquire()
                if resume == "none" and overwrite:
                    clear_previous_run(self.run_dir, overwrite=True)
            except Exception as e:  # every rank must fail the same way, not hang
                decision[0] = e
        broadcast_object_list(decision)
        if decision[0] is not None:
            raise decision[0]
        target = Path(decision[1]) if decision[1] else None
        set_seed(cfg.run.seed)

        model = self._build_model(target)
        optimizer = build_optimizer(model, cfg, fused=cfg.run.backend == "ddp")
        batches = batches_per_epoch(cfg.data, self.world)  # data.sources: their sum
        self.steps_per_epoch = batches // cfg.optim.grad_accum
        if self.steps_per_epoch < 1:
            raise ConfigError(f"data: {batches} batches per rank per epoch is fewer than "
                              f"optim.grad_accum={cfg.optim.grad_accum}")
        self.total_steps = cfg.schedule.max_steps or cfg.schedule.epochs * self.steps_per_epoch
        scheduler = build_scheduler(optimizer, cfg, self.total_steps, self.steps_per_epoch)
        self.raw_model = model
        if cfg.run.backend == "ddp":
            keep_grads_in_parameter_layout(model)
        self.model, self.optimizer, self.scheduler = acc.prepare(model, optimizer, scheduler)
        self.loss_fn = compile_loss(phase_loss, cfg)
        self.group_names = [g.get("name", str(i)) for i, g in enumerate(self.optimizer.param_groups)]

        self.state = TrainState(phase=cfg.phase.name)
        self._skipped_resumed = 0  # skipped shards the resumed checkpoint counted
        self.log = MetricsLog(self.run_dir / "metrics.jsonl", acc)
        self.window = LossWindow(acc.device)
        self.guard = NonFiniteGuard(self.raw_model, cfg.run.nan_skip_budget, acc.device)
        # What a checkpoint's state.json keeps of each (`TrainState.components`). Not accelerate's
        # register_for_checkpointing: it pickles each object to custom_checkpoint_N.pkl, loads them
        # with weights_only=False, and refuses a checkpoint whose file count differs from the objects
        # registered, so neither earlier checkpoints nor one with another set of parts would resume.
        self.components = {"loss_window": self.window, "nonfinite": self.guard}
        if target is not None:
            self._load(target)
        elif resume == "auto":
            self._restart_log()
        self.info = run_info(cfg, acc, self.raw_model, precision_source)
        logger.info("%s", run_info_line(self.info))
        # The record states what was trained: a finished run's config.yaml and run.json are left as they are.
        if acc.is_main_process and self.state.step < self.total_steps:
            write_text_atomic(self.run_dir / "config.yaml", f"# {run_info_line(self.info)}\n{dump_config(cfg)}")
            write_json_atomic(self.run_dir / RUN_INFO_NAME, self.info, indent=1)
        start_trackers(acc, cfg)
        self.log.write_text({"config": dump_config(cfg), "run": run_info_line(self.info)}, step=self.state.step)
        self._saved_step = self._evaluated_step = self.state.step if target is not None else -1
        self._step_t = torch.full((), self.state.step, dtype=torch.int64, device=acc.device)
        # Positive-case training: the gate of teacher forcing (class head or first-stage classifier).
        gate = Gate.from_config(cfg, acc.device, precision=cfg.run.precision)
        if gate is not None and gate.source == "cls_head" and "cls" not in model.tasks:
            raise ConfigError(f"phase.teacher_forcing.gate=cls_head: {cfg.model.name} has no class head; use "
                              "gate: first_stage with model.first_stage")
        self.positives = PositiveSelector(cfg, gate, self.rank)
        # data.sources: heads without labels in a window get no gradient, so the optimizer leaves
        # them as they are (DeepSpeed's engine steps inside backward, on its own flat buffers).
        self.idle = IdleParameters(self.raw_model) if cfg.data.sources and cfg.run.backend == "ddp" else None
        self.validator = Validator(cfg, acc, self.model, gate=gate,
                                   overlays=VAL_OVERLAYS if "tensorboard" in tracker_names(cfg.run) else 0)
        self.progress = Progress(self.total_steps, self.state.step, cfg.run.name,
                                 acc.is_main_process and cfg.run.progress)
        self._loaders: list = []  # this epoch's training loaders (data.sources: one per source)
        self._skipped_before = 0  # shards this process's loaders skipped in earlier epochs of this process
        logger.info("world size %d, %d steps per epoch, %d steps in all, starting at step %d",
                    self.world, self.steps_per_epoch, self.total_steps, self.state.step)

    # ---------------------------------------------------------------------------------------------
    # set-up

    def _build_model(self, target: Optional[Path]):
        cfg = self.cfg
        # Library weights (model.pretrained, model.encoder_pretrained) only for a fresh start: a
        # resumed or initialised model gets all its weights from the checkpoint.
        model = build_model(cfg.model, pretrained=target is None and not cfg.phase.init_from)
        if cfg.phase.init_from and target is None:
            ckpt = resolve_checkpoint(cfg.phase.init_from)
            reset = load_state_dict_transfer(model, read_weights(ckpt / WEIGHTS_NAME), str(ckpt))
            logger.info("initialised from %s%s", ckpt, f"; re-initialised {', '.join(reset)}" if reset else "")
            if cfg.phase.name == "phase2" and cfg.phase.cls_phase2_init == "from_phase1":
                if not hasattr(model, "init_phase2_class_input"):
                    raise ConfigError(f"phase.cls_phase2_init=from_phase1: {cfg.model.name} has no two-mode class head")
                model.init_phase2_class_input()
        device = "cuda" if torch.cuda.is_available() else "cpu"
        model.set_attention(resolve_attention(cfg.model.attention, cfg.run.precision, device))
        prepare_phase(model, cfg.phase)
        batch_norm = any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules())
        if cfg.data.batch_size < 2 and batch_norm:
            raise ConfigError(f"data.batch_size={cfg.data.batch_size} per process: {cfg.model.name} has batch norm, "
                              "which needs at least 2 images per training step; raise data.batch_size "
                              "(or data.global_batch_size)")
        if not any(p.requires_grad for p in model.parameters()):
            raise ConfigError(f"phase.frozen: every parameter of {cfg.model.name} is frozen, there is nothing to "
                              "train; evaluate a zero-shot model without training: mtlxray evaluate "
                              "--model-config CONFIG --shards SHARDS")
        return model

    def _load(self, ckpt: Path) -> None:
        state = verify_checkpoint(ckpt)
        if state.phase != self.cfg.phase.name:
            raise CheckpointError(f"{ckpt}: a {state.phase} checkpoint cannot resume {self.cfg.phase.name}")
        if state.world_size != self.world:
            raise CheckpointError(f"{ckpt}: written by {state.world_size} process(es), resumed by {self.world}; "
                                  "resume with the same number of processes for an exact continuation")
        if self.cfg.run.backend == "deepspeed":
            check_deepspeed_pickles(ckpt)
        try:
            self.accelerator.load_state(str(ckpt))
        except Exception as e:  # torch/accelerate raise many types for a corrupt part
            raise CheckpointError(f"{ckpt}: cannot load the training state ({type(e).__name__}): a part of the "
                                  "checkpoint is corrupt; resume from an earlier one with --resume PATH") from None
        self.state = state
        self._skipped_resumed = state.skipped_shards
        for name, component in self.components.items():
            if name in state.components:  # a part the checkpoint does not hold starts afresh
                component.load_state_dict(state.components[name])
        self.log.truncate_after(state.step)
        logger.info("resumed from %s at step %d (epoch %d, batch %d)", ckpt, state.step, state.epoch,
                    state.batch_in_epoch)

    def _restart_log(self) -> None:
        """`--resume auto` without a complete checkpoint starts at step 0: an earlier attempt's lines
        (a run killed before its first save) are dropped, not followed by the same steps again."""
        dropped = self.log.truncate_after(0)
        if dropped:
            logger.warning("no complete checkpoint in %s: starting at step 0, and dropped the %d line(s) an earlier "
                           "attempt wrote to %s", self.ckpt_root, dropped, self.log.path)

    def _save(self, *, last: bool, best: bool) -> None:
        self.state.components = {name: component.state_dict() for name, component in self.components.items()}
        save_checkpoint(self.accelerator, self.model, self.raw_model, self.ckpt_root, self.state, self.cfg,
                        last=last, best=best)
        self._saved_step = self.state.step

    # ---------------------------------------------------------------------------------------------
    # loop

    def fit(self) -> int:
        """Train to the planned step count; 0 when done, EXIT_REQUEUE after a signal-triggered save."""
        if agree(self.accelerator, self.stop.requested is not None)[0]:
            logger.warning("%s before training started: nothing to save; exit %d for a requeue",
                           self.stop.requested or "a peer's signal", EXIT_REQUEUE)
            return EXIT_REQUEUE
        if self.state.step >= self.total_steps:
            logger.info("nothing to do: step %d of %d already reached", self.state.step, self.total_steps)
            return 0
        self.window.t0 = time.perf_counter()
        with self.progress:
            while self.state.step < self.total_steps:
                if self._train_epoch():
                    logger.warning("stopping at step %d on %s; exit %d for a requeue", self.state.step,
                                   self.stop.requested or "a peer's signal", EXIT_REQUEUE)
                    if self._saved_step != self.state.step:
                        self._save(last=True, best=False)
                    return EXIT_REQUEUE
            if self._evaluated_step != self.state.step:
                self._evaluate(save_last=self._saved_step != self.state.step)
            elif self._saved_step != self.state.step:
                self._save(last=True, best=False)
        return 0

    def _batches(self):
        """This rank's batches from the current data position to the end of the epoch."""
        s = self.state
        self._skipped_before = self._skipped_here()
        self._loaders = []
        if self.cfg.data.sources:  # alternating disjoint datasets: each batch says which labels it has
            return source_batches(self.cfg.data, seed=self.cfg.run.seed, epoch=s.epoch, rank=self.rank,
                                  world_size=self.world, start_batch=s.batch_in_epoch, wrap=iterate_keeping_rng,
                                  loaders=self._loaders)
        loader = build_train_loader(self.cfg.data, seed=self.cfg.run.seed, epoch=s.epoch, rank=self.rank,
                                    world_size=self.world, start_batch=s.batch_in_epoch)
        self._loaders.append(loader)
        return iterate_keeping_rng(loader)

    def _skipped_here(self) -> int:
        """Shards this process's training loaders skipped since it started."""
        return self._skipped_before + sum(len(loader.skipped_shards) for loader in self._loaders)

    def _train_epoch(self) -> bool:
        """Consume the rest of the epoch (whole accumulation windows); True if asked to stop."""
        acc, cfg, s = self.accelerator, self.cfg, self.state
        per_epoch = self.steps_per_epoch * cfg.optim.grad_accum
        it = self._batches()
        self.model.train()
        while s.batch_in_epoch < per_epoch and s.step < self.total_steps:
            batch = next(it, None)
            if batch is None:
                raise DataError(f"data: the loader ended after {s.batch_in_epoch} of {per_epoch} batches "
                                f"in epoch {s.epoch} on rank {self.rank}")
            batch = batch_to_device(batch, acc.device)
            self._micro_step(batch)
            n = batch["img"].shape[0] * self.world
            s.batch_in_epoch += 1
            s.samples_seen += n
            self.window.samples += n
            if not acc.sync_gradients:
                continue
            s.step += 1
            self.progress.update(s.step)
            epoch_end = s.batch_in_epoch >= per_epoch
            if epoch_end:
                s.epoch += 1
                s.batch_in_epoch = 0
            if self._after_step(epoch_end):
                return True
            if epoch_end:
                break
        return False

    def _micro_step(self, batch: dict) -> None:
        """Forward/backward of one batch; the optimizer steps at accumulation boundaries."""
        acc, cfg = self.accelerator, self.cfg
        deepspeed = cfg.run.backend == "deepspeed"
        with acc.accumulate(self.model):
            if not deepspeed and self.state.batch_in_epoch % cfg.optim.grad_accum == 0:
                self.guard.begin_window()
            out = self.model(batch["img"])
            include = self.positives.select(out, batch, step=self.state.step, batch_index=self.state.batch_in_epoch)
            loss, parts = self.loss_fn(out, batch, cfg.phase, cfg.model.cls_loss, include=include,
                                       kbox_confidence=cfg.model.det_kbox_confidence)
            self.window.add({"loss": loss, **{f"loss/{k}": v for k, v in parts.items()}})
            if deepspeed:
                if agree(acc, not bool(torch.isfinite(loss.detach())))[0]:
                    self.guard.skip_on_host(self.state.step + 1)  # the engine never sees this batch
                else:
                    acc.backward(loss)
            else:
                acc.backward(loss)
                if self.idle is not None:
                    self.idle.observe(batch.get("tasks"), parts)
                if acc.sync_gradients:
                    if self.idle is not None:
                        self.idle.release()
                    norm = acc.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip or math.inf)
                    found = self.guard.found_inf(norm)
                    self.guard.arm(self.optimizer.optimizer, found)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            if acc.sync_gradients:
                self._step_t += 1
                if not deepspeed:
                    self.guard.after_step(found, self._step_t)
                self.scheduler.step()

    def _after_step(self, epoch_end: bool) -> bool:
        """Log, evaluate and save as due; returns whether the ranks agreed to stop."""
        cfg, s = self.cfg, self.state
        done = s.step >= self.total_steps
        log_due = s.step % cfg.run.log_every == 0 or done
        eval_due = (cfg.run.eval_every > 0 and s.step % cfg.run.eval_every == 0) or \
                   (cfg.run.eval_every == 0 and epoch_end) or done
        save_due = s.step % cfg.run.save_every == 0 or epoch_end or done
        stop = False
        if log_due or eval_due or save_due:
            stop = self._sync(log_due)
        if eval_due:
            self._evaluate(save_last=save_due or stop)
        elif save_due or stop:
            self._save(last=True, best=False)
        return stop

    def _sync(self, write_log: bool) -> bool:
        """The log step: one all-reduce and one host read of the loss sums, skip count and stop flag."""
        acc, s = self.accelerator, self.state
        names, sums = self.window.sync_values()
        skipped, bad_step = self.guard.sync_values()
        stop = torch.tensor(float(self.stop.requested is not None), dtype=torch.float64, device=acc.device)
        shards = torch.tensor(float(self._skipped_here()), dtype=torch.float64, device=acc.device)
        local = torch.stack([*sums, shards, skipped, bad_step, stop])
        if self.world > 1:
            # Sums (and skipped shards) add up across ranks; the skip count, step and stop flag are
            # equal or OR-ed: take the max.
            summed = local.clone()
            torch.distributed.all_reduce(summed)
            torch.distributed.all_reduce(local, op=torch.distributed.ReduceOp.MAX)
            local = torch.cat([summed[:len(sums) + 1], local[len(sums) + 1:]])
        values = local.tolist()
        self.guard.check(values[-3], values[-2], s.step)
        # Over the run: the count the checkpoint brought plus what this process's loaders skipped.
        s.skipped_shards = self._skipped_resumed + int(values[len(sums)])
        if write_log:
            self._log_train(LossWindow.means(names, values[:len(sums)]))
        return values[-1] > 0

    def _log_train(self, means: dict[str, float]) -> None:
        s, w = self.state, self.window
        elapsed = max(1e-9, time.perf_counter() - w.t0)
        groups = self.optimizer.param_groups
        record = {"type": "train", "step": s.step, "total_steps": self.total_steps, "epoch": s.epoch,
                  "samples": s.samples_seen, **means,
                  "lr": groups[0]["lr"] / groups[0].get("lr_mult", 1.0),
                  **{f"lr/{n}": g["lr"] for n, g in zip(self.group_names, groups)},
                  "skipped": self.guard.skipped,
                  "skipped_shards": s.skipped_shards,
                  "img_per_s": w.samples / elapsed, "world_size": self.world,
                  "time": time.time()}
        self.log.write(record)
        self.progress.report(record)
        w.reset()

    # ---------------------------------------------------------------------------------------------
    # evaluation and the best checkpoint

    def evaluate(self) -> dict[str, float]:
        return self.validator.run()

    def _evaluate(self, save_last: bool) -> None:
        cfg, s = self.cfg, self.state
        values = self.evaluate()
        self._evaluated_step = s.step
        self.log.write({"type": "eval", "step": s.step, "epoch": s.epoch, **values})
        self.log.write_images({"val/overlays": self.validator.image}, step=s.step)
        value = values.get(cfg.run.best_metric, math.nan)
        better = not math.isnan(value) and (
            s.best_metric is None or (value > s.best_metric if cfg.run.best_mode == "max" else value < s.best_metric))
        if better:
            s.best_metric, s.best_step = value, s.step
        logger.info("step %d: %s", s.step, ", ".join(
            f"{k}={values[k]:.4f}" for k in ("val/loss", "val/lung_dice", "val/inf_dice", "val/accuracy",
                                              "val/f1_macro") if k in values))
        if better or save_last:
            self._save(last=save_last, best=better)

    # ---------------------------------------------------------------------------------------------

    def close(self) -> None:
        """End trackers, release the run folder, restore signal handlers and end the process group."""
        self.stop.close()
        self.accelerator.end_training()
        self.lock.release()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # gloo threads freeing tensors during interpreter exit can SIGABRT (pytorch#190489):
            # free them while the group still exists, then wait for it at a barrier.
            gc.collect()
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()

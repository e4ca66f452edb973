"""A phase1 → phase2 chain with submitit: Slurm (afterok dependencies) or local, requeue-safe.

Each phase is one submitit job running `TrainJob`, a thin picklable `Checkpointable` holding only
its arguments. Every task of a job sets the torch.distributed variables from submitit's
`JobEnvironment` and calls `mtlxray.train.main.run_training`. On preemption or timeout (submitit's
USR2, or SIGTERM/SIGUSR1) every rank saves `last` at the same step and training returns 75; then
global rank 0 hands over to submitit, which calls `checkpoint()` (a resubmission with
resume="auto") and requeues the job.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import submitit

from mtlxray.config import load_config
from mtlxray.errors import EXIT_REQUEUE, ConfigError, MtlxError
from mtlxray.launch.slurm import slurm_parameters

__all__ = ["TrainJob", "PhaseReport", "Pipeline", "submit_pipeline", "cli_main"]

logger = logging.getLogger(__name__)

REQUEUE_GRACE_S = 300
"""How long a non-zero rank waits, after saving, for rank 0's requeue to stop it."""


class TrainingFailed(MtlxError):
    """A training job ended with a non-zero exit that was not a requeue."""


class TrainJob(submitit.helpers.Checkpointable):
    """One training phase as a submitit job: `config` + `overrides`, run from `workdir`."""

    def __init__(self, config: str, overrides: Sequence[str] = (), resume: str = "auto",
                 workdir: Optional[str] = None) -> None:
        self.config = config
        self.overrides = list(overrides)
        self.resume = resume
        self.workdir = workdir or os.getcwd()

    def __call__(self) -> str:
        """Train; returns the run folder. Rank 0 requeues the job after a signal-triggered save."""
        from mtlxray.train.main import run_training

        # The job's stdout is its log, as under `mtlxray train`.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        os.chdir(self.workdir)
        env = submitit.JobEnvironment()  # the trainer reads the task's identity through mtlxray.dist
        cfg = load_config(self.config, self.overrides)
        with _preempt_signal_to_trainer(env) as submitit_handler:
            rc = run_training(cfg, resume=self.resume)
        if rc == EXIT_REQUEUE:
            logger.info("rank %d saved after a signal", env.global_rank)
            if env.global_rank == 0 and submitit_handler is not None:
                # Every rank has saved `last` at the same step: now let submitit checkpoint()
                # (a resume="auto" resubmission) and requeue. It exits this process.
                submitit_handler(env._usr_sig(), None)
            elif env.global_rank != 0:
                # Rank 0 requeues the whole job, which stops this task too; a result written
                # here would read as the job's end.
                time.sleep(REQUEUE_GRACE_S)
            raise TrainingFailed(f"{self.config}: training stopped for a requeue that did not happen")
        if rc != 0:
            raise TrainingFailed(f"{self.config}: training exited with {rc}")
        return str(Path(cfg.run.output_dir) / cfg.run.name)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The resubmission: the same phase, resuming from the `last` checkpoint every rank wrote."""
        logger.info("requeueing %s with resume=auto", self.config)
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides, "auto", self.workdir))


@contextmanager
def _preempt_signal_to_trainer(env: submitit.JobEnvironment) -> Iterator[Optional[Any]]:
    """Route submitit's preemption signal to the trainer's save-and-stop (SIGUSR1) while training.

    submitit's own handler would checkpoint and exit in the middle of a step, on rank 0 only;
    the trainer instead saves on every rank at one step boundary. Yields submitit's handler.
    """
    sig = env._usr_sig()
    previous = signal.getsignal(sig)

    def forward(signum: int, frame: Any) -> None:
        if callable(signal.getsignal(signal.SIGUSR1)):
            signal.raise_signal(signal.SIGUSR1)
        else:
            logger.warning("%s before training installed its handlers: ignored", signal.Signals(signum).name)

    if sig != signal.SIGUSR1:
        signal.signal(sig, forward)
    try:
        yield previous if callable(previous) else None
    finally:
        if sig != signal.SIGUSR1:
            signal.signal(sig, previous)


@dataclass
class PhaseReport:
    """How one phase ended."""

    config: str
    job_id: Optional[str]
    state: str
    run_dir: str
    best_checkpoint: Optional[str]
    error: Optional[str] = None

    def __str__(self) -> str:
        best = self.best_checkpoint or "-"
        extra = f" ({self.error})" if self.error else ""
        return f"{self.config}: job {self.job_id or '-'} {self.state}; run {self.run_dir}; best {best}{extra}"


@dataclass
class Phase:
    """One submitted (or not yet submitted) phase of a pipeline."""

    config: str
    overrides: list[str]
    run_dir: Path
    job: Optional[submitit.Job] = None


@dataclass
class Pipeline:
    """The phases of a chain, in order, with their submitit jobs."""

    phases: list[Phase]
    folder: Path
    executor: str
    reports: list[PhaseReport] = field(default_factory=list)

    @property
    def jobs(self) -> list[submitit.Job]:
        return [p.job for p in self.phases if p.job is not None]

    def wait(self) -> list[PhaseReport]:
        """Wait for every phase; a failed phase cancels the ones waiting on it. Reports each phase."""
        reports: list[PhaseReport] = []
        failed = False
        for phase in self.phases:
            if phase.job is None:
                reports.append(_report(phase, "NOT_SUBMITTED", "an earlier phase failed"))
                continue
            if failed:
                # Its afterok dependency can never be satisfied: Slurm would keep it pending forever.
                phase.job.cancel(check=False)
                reports.append(_report(phase, "DependencyNeverSatisfied", "an earlier phase failed"))
                continue
            error = None
            try:
                phase.job.result()
            except Exception as e:  # submitit re-raises the job's failure as a generic error
                error = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
                failed = True
            reports.append(_report(phase, _final_state(phase.job, failed=error is not None), error))
        self.reports = reports
        return reports


_SETTLED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED",
            "BOOT_FAIL", "DEADLINE"}
SETTLE_TIMEOUT_S = 120
"""How long `wait()` gives Slurm to record a job's end after its result was written."""


def _final_state(job: submitit.Job, failed: bool) -> str:
    """Slurm's final state for the job (the result file is written before the job ends)."""
    if not isinstance(job, submitit.SlurmJob):
        return "FAILED" if failed else "COMPLETED"
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    while True:
        state = (job.watcher.get_state(job.job_id, mode="force") or "UNKNOWN").split()[0]
        if state in _SETTLED or time.monotonic() > deadline:
            return state
        time.sleep(1.0)


def _report(phase: Phase, state: str, error: Optional[str]) -> PhaseReport:
    best = phase.run_dir / "checkpoints" / "best"
    return PhaseReport(config=phase.config, job_id=phase.job.job_id if phase.job else None, state=state,
                       run_dir=str(phase.run_dir), best_checkpoint=str(best) if best.exists() else None,
                       error=error)


def _executor(kind: str, folder: Path, params: dict[str, Any]) -> submitit.AutoExecutor:
    if kind == "slurm":
        if shutil.which("sbatch") is None:
            raise ConfigError("executor=slurm: `sbatch` is not on PATH (not a Slurm login node?); "
                              "use executor=local to run the chain on this machine")
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    elif kind == "local":
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
        params["nodes"] = 1
    else:
        raise ConfigError(f"executor must be `slurm` or `local`, got {kind!r}")
    executor.update_parameters(**params)
    return executor


def submit_pipeline(configs: Sequence[str | Path], executor: Optional[str] = None,
                    overrides: Optional[Sequence[str]] = None, folder: Optional[str | Path] = None,
                    **slurm_params: Any) -> Pipeline:
    """Submit one job per config; each later one runs after the previous succeeds, from its best checkpoint.

    `executor` defaults to the first config's launch.executor. `overrides` (`a.b=c`) apply to every
    phase; phase k>1 also gets `phase.init_from=<run of phase k-1>/checkpoints/best`. `slurm_params`
    are submitit parameters (nodes, gpus_per_node, tasks_per_node, timeout_min, slurm_partition,
    ...) that override each config's launch section. Slurm phases are chained with `afterok`;
    local ones run one after the other (the local executor has no dependencies), so with
    executor="local" this returns once all but the last have finished.
    """
    if not configs:
        raise ConfigError("submit_pipeline needs at least one config")
    overrides = list(overrides or [])
    cfgs = [str(Path(c).resolve()) for c in configs]
    first = load_config(cfgs[0], overrides)
    kind = executor or first.launch.executor
    folder = Path(folder or Path(first.run.output_dir) / first.run.name / "submitit").resolve()
    phases: list[Phase] = []
    previous: Optional[Phase] = None
    for path in cfgs:
        phase_over = list(overrides)
        if previous is not None:
            phase_over.append(f"phase.init_from={previous.run_dir / 'checkpoints' / 'best'}")
        cfg = load_config(path, phase_over)
        phases.append(Phase(path, phase_over, (Path(cfg.run.output_dir) / cfg.run.name).resolve()))
        previous = phases[-1]
    pipeline = Pipeline(phases, folder, kind)

    for i, phase in enumerate(phases):
        cfg = load_config(phase.config, phase.overrides)
        params = slurm_parameters(cfg.launch, overrides=slurm_params)
        params.setdefault("name", f"mtlx-{cfg.run.name}")
        prev_job = phases[i - 1].job if i else None
        if prev_job is not None and kind == "slurm":
            extra = dict(params.get("slurm_additional_parameters", {}))
            extra["dependency"] = f"afterok:{prev_job.job_id}"
            params["slurm_additional_parameters"] = extra
        elif prev_job is not None and not _succeeded(prev_job):
            break
        ex = _executor(kind, folder, params)
        phase.job = ex.submit(TrainJob(phase.config, phase.overrides, "auto"))
        logger.info("submitted %s as job %s (%s); run dir %s; logs in %s", Path(phase.config).name,
                    phase.job.job_id, kind, phase.run_dir, folder)
    return pipeline


def _succeeded(job: submitit.Job) -> bool:
    try:
        job.result()
    except Exception as e:  # the job's failure, re-raised by submitit
        logger.error("job %s failed: %s", job.job_id, str(e).strip().splitlines()[-1:] or e)
        return False
    return True


def cli_main(args: argparse.Namespace) -> int:
    """`mtlxray submit --config C [--then C2 ...]`."""
    params: dict[str, Any] = {}
    for key in ("nodes", "gpus_per_node", "timeout_min"):
        if getattr(args, key) is not None:
            params[key] = getattr(args, key)
    if args.partition is not None:
        params["slurm_partition"] = args.partition
    pipeline = submit_pipeline([args.config, *args.then], executor=args.executor,
                               overrides=args.overrides, folder=args.folder, **params)
    for phase in pipeline.phases:
        job_id = phase.job.job_id if phase.job else "-"
        sys.stdout.write(f"{Path(phase.config).name}\t{job_id}\t{phase.run_dir}\n")
    if not args.wait:
        return 0
    reports = pipeline.wait()
    for report in reports:
        sys.stdout.write(f"{report}\n")
    return 0 if all(r.state == "COMPLETED" for r in reports) else 1

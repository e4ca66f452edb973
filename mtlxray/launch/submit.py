"""A chain of training phases with submitit: Slurm (afterok dependencies) or local, requeue-safe.

Each phase is one submitit job running `TrainJob`, a thin picklable `Checkpointable` holding only
its arguments. Every task of a job sets the torch.distributed variables through
`mtlxray.dist.export_submitit_env` and calls `mtlxray.train.main.run_training`.

Preemption and time limits: the preemption signal (`mtlxray.launch.slurm.PREEMPT_SIGNAL`, USR2,
submitit's default, `launch.requeue_signal_delay_s` before the time limit: the executor's
`slurm_signal_delay_s`) reaches every task, where the training loop's stop handlers catch it: every
rank saves `last` at the same step boundary and training returns 75. Then global rank 0 raises the
signal again, now for the handler submitit installed in the job, which calls `checkpoint()` (a
resubmission with resume="auto") and requeues the job; the other ranks exit 0 at once, without a
result, so that nothing stale is read as the job's outcome, nothing waits for the requeue, and no
task exits non-zero (srun's `--kill-on-bad-exit` would kill rank 0 before it requeues).
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import submitit
from submitit.core.utils import FailedJobError, UncompletedJobError

from mtlxray.config import load_config
from mtlxray.errors import EXIT_REQUEUE, ConfigError, MtlxError
from mtlxray.launch.chain import PhasePlan, plan_chain, validate_chain
from mtlxray.launch.progress import ProgressRelay
from mtlxray.launch.slurm import PREEMPT_SIGNAL, sbatch_flags, slurm_parameters

__all__ = ["TrainJob", "PhaseReport", "Pipeline", "submit_pipeline", "SubmitError"]

logger = logging.getLogger(__name__)


class TrainingFailed(MtlxError):
    """A training job ended with a non-zero exit that was not a requeue."""


class SubmitError(MtlxError):
    """sbatch refused a job, or the cluster can never run it."""


class TrainJob(submitit.helpers.Checkpointable):
    """One training phase as a submitit job: `config` + `overrides`, run from `workdir`."""

    def __init__(self, config: str, overrides: Sequence[str] = (), resume: str = "auto",
                 workdir: Optional[str] = None) -> None:
        self.config = config
        self.overrides = list(overrides)
        self.resume = resume
        self.workdir = workdir or os.getcwd()

    def __call__(self) -> str:
        """Train; returns the run folder. After a signal-triggered save, rank 0 requeues the job."""
        from mtlxray.dist import export_submitit_env
        from mtlxray.train.main import run_training

        # The job's stdout is its log, as under `mtlxray train`.
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                            datefmt="%H:%M:%S")
        logging.getLogger("accelerate").setLevel(logging.WARNING)  # one line per checkpoint file otherwise
        os.chdir(self.workdir)
        world = export_submitit_env()
        cfg = load_config(self.config, self.overrides)
        rc = run_training(cfg, resume=self.resume)
        if rc == EXIT_REQUEUE:
            if world.rank != 0:
                logger.info("rank %d: training saved (exit %d); rank 0 requeues the job", world.rank, rc)
                sys.exit(0)  # no result file: the requeued job writes this task's result
            logger.info("training saved (exit %d): submitit checkpoints and requeues the job", rc)
            _requeue_through_submitit()  # exits this process once the job is requeued
            raise TrainingFailed(f"{self.config}: training stopped for a requeue that submitit did not do")
        if rc != 0:
            raise TrainingFailed(f"{self.config}: training exited with {rc}")
        return str(Path(cfg.run.output_dir) / cfg.run.name)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """The resubmission: the same phase, resuming from the `last` checkpoint every rank wrote."""
        logger.info("requeueing %s with resume=auto", self.config)
        return submitit.helpers.DelayedSubmission(TrainJob(self.config, self.overrides, "auto", self.workdir))


def _requeue_through_submitit() -> None:
    """Give the preemption signal back to submitit's own handler, which requeues and exits.

    The training loop caught the signal (its stop handlers cover USR2) so that every rank saved at
    one step boundary, and restored submitit's handler when it closed. Raising the signal again now
    runs that handler, submitit's preemption protocol: it calls `TrainJob.checkpoint()` (the
    resubmission), `scontrol requeue`s the job and exits.
    """
    signum = signal.Signals[f"SIG{PREEMPT_SIGNAL}"]
    if not callable(signal.getsignal(signum)):  # the default action would end the job without a requeue
        raise TrainingFailed(f"training saved, but submitit's {signum.name} handler is not in place to requeue "
                             "the job; resubmit it to resume from checkpoints/last")
    try:
        signal.raise_signal(signum)
    except SystemExit as e:
        # Requeued: submitit exits with -1 (255); say 75, the requeue code, like `mtlxray train`.
        # Other codes are submitit's own signals (the local executor's requeue code): kept.
        raise SystemExit(EXIT_REQUEUE if e.code == -1 else e.code) from None
    except subprocess.CalledProcessError as e:
        cmd = " ".join(map(str, e.cmd)) if isinstance(e.cmd, (list, tuple)) else str(e.cmd)
        raise TrainingFailed(f"training saved, but `{cmd}` failed (exit {e.returncode}); resubmit the job to "
                             "resume from checkpoints/last") from None


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
    """One phase of a pipeline: its plan, its submitit parameters and, once submitted, its job."""

    plan: PhasePlan
    params: dict[str, Any]
    job: Optional[submitit.Job] = None
    relay: Optional[ProgressRelay] = None

    @property
    def config(self) -> str:
        return self.plan.config

    @property
    def overrides(self) -> list[str]:
        return list(self.plan.overrides)

    @property
    def run_dir(self) -> Path:
        return self.plan.run_dir


@dataclass
class Pipeline:
    """The phases of a chain, in order, with their submitit jobs (none in a dry run)."""

    phases: list[Phase]
    folder: Path
    executor: str
    dry_run: bool = False
    reports: list[PhaseReport] = field(default_factory=list)
    relay_every_s: float = 5.0

    @property
    def jobs(self) -> list[submitit.Job]:
        return [p.job for p in self.phases if p.job is not None]

    def describe(self) -> str:
        """Each job's sbatch options, one job per line; `<phaseK>` stands for the id phase K will get."""
        lines = []
        for phase in self.phases:
            lines.append(f"# phase {phase.plan.index}: {phase.config} -> {phase.run_dir}")
            if self.executor == "slurm":
                dep = ([f"--dependency=afterok:<phase{phase.plan.index - 1}>"] if phase.plan.index > 1 else [])
                lines.append(" ".join(["sbatch", *sbatch_flags(phase.params), *dep]))
            else:
                lines.append("local: " + " ".join(f"{k}={v}" for k, v in _local_params(phase.params).items()))
        return "\n".join(lines) + "\n"

    def wait(self) -> list[PhaseReport]:
        """Wait for every phase; a failed phase cancels the ones waiting on it. Reports each phase.

        A job with several tasks (several nodes or GPUs) counts as done once every task is.
        """
        reports: list[PhaseReport] = []
        failed = False
        for phase in self.phases:
            if phase.job is None:
                reports.append(_report(phase, "NOT_SUBMITTED", "an earlier phase failed" if failed else None))
                continue
            if failed:
                # Its afterok dependency can never be satisfied: Slurm would keep it pending forever.
                phase.job.cancel(check=False)
                reports.append(_report(phase, "DependencyNeverSatisfied", "an earlier phase failed"))
                continue
            error = None
            _relay_until_done(phase, self.relay_every_s)
            try:
                phase.job.results()  # every task's result, not only task 0's
            except Exception as e:  # submitit re-raises the job's failure as a generic error
                error = _job_error(phase.job, e)
                failed = True
            reports.append(_report(phase, _final_state(phase.job, failed=error is not None), error))
        self.reports = reports
        return reports


def _relay_until_done(phase: Phase, every_s: float) -> None:
    """With a relay, poll the job every `every_s` seconds and relay its progress until it ends."""
    if phase.relay is None or phase.job is None:
        return
    while not phase.job.done():
        if phase.job.state.startswith("RUNNING"):
            phase.relay.start()
        phase.relay.poll()
        time.sleep(every_s)
    phase.relay.poll()


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


_QUALIFIED = re.compile(r"^(?:[A-Za-z_]\w*\.)+(?=[A-Za-z_]\w*: )")
_LOG_ERROR = re.compile(r"error|exception|cancelled|killed|timeout|time limit|out of memory|oom", re.IGNORECASE)


def _job_error(job: submitit.Job, exc: BaseException) -> str:
    """One line: the cause of a job's failure as its log states it, and where the log is."""
    task = job.task(0) if job.num_tasks > 1 else job
    text = str(exc)
    line = ""
    if isinstance(exc, FailedJobError) and "----------------------" in text:
        # A task raised: submitit's message holds the traceback; its last line is the cause.
        trace = text.split("----------------------")[1]
        line = next((ln.strip() for ln in reversed(trace.splitlines()) if ln.strip()), "")
        line = _QUALIFIED.sub("", line)
    elif isinstance(exc, UncompletedJobError):
        # No result (killed, time limit, out of memory, node failure): the log's last word on it.
        for path in (task.paths.stderr, task.paths.stdout):
            try:
                lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
            except OSError:
                continue
            line = next((ln for ln in reversed(lines) if _LOG_ERROR.search(ln)), lines[-1] if lines else "")
            if line:
                break
    if not line:
        line = next((ln.strip() for ln in text.splitlines() if ln.strip()), type(exc).__name__)
    return f"{line} (log {task.paths.stderr})"


def _report(phase: Phase, state: str, error: Optional[str]) -> PhaseReport:
    best = phase.plan.best_checkpoint
    return PhaseReport(config=phase.config, job_id=phase.job.job_id if phase.job else None, state=state,
                       run_dir=str(phase.run_dir), best_checkpoint=str(best) if best.exists() else None,
                       error=error)


def _local_params(params: dict[str, Any]) -> dict[str, Any]:
    local = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    local["nodes"] = 1
    return local


def _executor(kind: str, folder: Path, params: dict[str, Any]) -> submitit.AutoExecutor:
    if kind == "slurm":
        executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="local")
        params = _local_params(params)
    executor.update_parameters(**params)
    return executor


def _sbatch_test_only(phase: Phase) -> None:
    """Ask Slurm whether it could ever run this job (`sbatch --test-only`): fail now, not pend forever."""
    cmd = ["sbatch", "--test-only", *sbatch_flags(phase.params), "--wrap=true"]
    try:
        res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError) as e:
        raise SubmitError(f"{phase.plan.label}: sbatch --test-only failed to run: {e}") from None
    if res.returncode != 0:
        reason = _last_line(res.stderr or res.stdout) or f"exit {res.returncode}"
        raise SubmitError(f"{phase.plan.label}: the cluster cannot run this job ({reason}); "
                          f"asked for: {' '.join(sbatch_flags(phase.params))}")


def _last_line(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def _submit(executor: submitit.AutoExecutor, phase: Phase) -> submitit.Job:
    # submitit prints sbatch's stderr itself before raising; the one-line error below says it.
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            return executor.submit(TrainJob(phase.config, phase.overrides, "auto"))
    except FailedJobError as e:
        raise SubmitError(f"{phase.plan.label}: sbatch failed: {_last_line(str(e)) or 'no message'}") from None


def submit_pipeline(configs: Sequence[str | Path], executor: Optional[str] = None,
                    overrides: Optional[Sequence[str]] = None, folder: Optional[str | Path] = None,
                    dry_run: bool = False, phase_overrides: Optional[dict[int, Sequence[str]]] = None,
                    relay: Optional[Callable[[str], None]] = None, relay_every_s: float = 5.0,
                    **slurm_params: Any) -> Pipeline:
    """Submit one job per config; each later one runs after the previous succeeds, from its best checkpoint.

    Before anything is submitted, the whole chain is checked (`validate_chain`: configs, shards,
    run folders, the init_from chain) and, on Slurm, every job is put to `sbatch --test-only`, so
    that a request the cluster can never run fails now instead of pending forever.
    `executor` defaults to the first config's launch.executor. `overrides` (`a.b=c`) apply to every
    phase, `phase_overrides[k]` to phase k (1-based) only; phase k>1 also gets
    `phase.init_from=<run of phase k-1>/checkpoints/best`. `slurm_params` are submitit parameters
    (nodes, gpus_per_node, tasks_per_node, cpus_per_task, mem_gb, timeout_min, slurm_partition,
    slurm_account, slurm_qos, ...) that override each config's launch section. Slurm phases are
    chained with `afterok`; local ones run one after the other (the local executor has no
    dependencies), so with executor="local" this returns once all but the last have finished.
    `dry_run` checks and plans, and submits nothing (`Pipeline.describe()` shows the jobs).
    `relay`: while this function or `Pipeline.wait()` waits for a job, each new training log step
    and evaluation of its run is passed to it as a line (`mtlxray.launch.progress.ProgressRelay`),
    polled every `relay_every_s` seconds.
    """
    overrides = list(overrides or [])
    kind = executor or plan_chain(configs, overrides, phase_overrides)[0].cfg.launch.executor
    if kind not in ("slurm", "local"):
        raise ConfigError(f"executor must be `slurm` or `local`, got {kind!r}")
    if kind == "slurm" and not dry_run and shutil.which("sbatch") is None:
        raise ConfigError("executor=slurm: `sbatch` is not on PATH (not a Slurm login node?); "
                          "use executor=local to run the chain on this machine")
    if submitit.JobEnvironment.USR_SIG != PREEMPT_SIGNAL:
        raise ConfigError(f"SUBMITIT_PREEMPT_SIGNAL={submitit.JobEnvironment.USR_SIG}: mtlxray's jobs save and "
                          f"requeue on {PREEMPT_SIGNAL}, as slurm/train.sh does; unset it")
    plans = validate_chain(configs, overrides, phase_overrides)
    first = plans[0].cfg
    folder = Path(folder or Path(first.run.output_dir) / first.run.name / "submitit").resolve()
    phases = []
    for plan in plans:
        params = slurm_parameters(plan.cfg.launch, overrides=slurm_params)
        params.setdefault("name", f"mtlx-{plan.cfg.run.name}")
        phases.append(Phase(plan, params))
    pipeline = Pipeline(phases, folder, kind, dry_run=dry_run, relay_every_s=relay_every_s)
    if dry_run:
        return pipeline
    if kind == "slurm":
        for phase in phases:
            _sbatch_test_only(phase)

    try:
        for i, phase in enumerate(phases):
            params = dict(phase.params)
            prev_job = phases[i - 1].job if i else None
            if prev_job is not None and kind == "slurm":
                params["slurm_additional_parameters"] = {**params.get("slurm_additional_parameters", {}),
                                                         "dependency": f"afterok:{prev_job.job_id}"}
            elif prev_job is not None and not _succeeded(phases[i - 1], relay_every_s):
                break
            if relay is not None:  # made before the job can write: what the run folder holds is not news
                phase.relay = ProgressRelay(phase.run_dir / "metrics.jsonl", phase.run_dir.name, relay)
            phase.job = _submit(_executor(kind, folder, params), phase)
            logger.info("submitted %s as job %s (%s); run dir %s; logs in %s", Path(phase.config).name,
                        phase.job.job_id, kind, phase.run_dir, folder)
    except BaseException:
        if kind == "slurm":  # half a chain is worse than none: its later phases would never run
            for job in pipeline.jobs:
                job.cancel(check=False)
        raise
    return pipeline


def _succeeded(phase: Phase, relay_every_s: float) -> bool:
    job = phase.job
    _relay_until_done(phase, relay_every_s)
    try:
        job.results()
    except Exception as e:  # the job's failure, re-raised by submitit
        logger.error("job %s failed: %s", job.job_id, _job_error(job, e))
        return False
    return True

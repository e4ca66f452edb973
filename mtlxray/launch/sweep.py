"""`mtlxray sweep`: one phase chain per (point, seed), on Slurm as one job array per phase, or locally.

The points are the product of the `--grid` axes (`key=v1,v2`); each point runs for every seed,
and each such element is a whole chain (`--config C --then C2 ...`) in DIR/<point>/seed<k>/, its
runs named after the point in the trackers (`run.tracker_run_name`), all in one tracker experiment
named after the sweep (`run.experiment`). After its last phase, an element's best checkpoint is
evaluated on the test split (`--eval-subset`, default the last phase's subset) into
DIR/<point>/seed<k>/eval-<subset>/ (metrics.json with per-image records, per_image.csv).

Slurm: phase k of every element needing work is one job array (submitit's `executor.batch()`, with
`slurm_array_parallelism`), and phase k+1's array depends on it element by element (`aftercorr`),
so a failed element holds up only its own later phases. Local: `--jobs N` worker slots, each
pinned to its share of the CPU cores, run whole elements one after another (submitit's local
executor has no dependencies, no concurrency limit and no pinning, so the slots are written out here).

The whole sweep is checked before anything runs (every element's chain as `mtlxray submit` checks
it, and every phase's request with `sbatch --test-only`). DIR/sweep.json records the points, the
elements, their job ids and states. Running the same command again skips finished elements (every
phase's best checkpoint and every evaluation present), leaves ones whose jobs are still queued or
running, and runs the rest again (training resumes from their checkpoints).
"""

from __future__ import annotations

import contextlib
import io
import itertools
import json
import logging
import os
import queue
import re
import shutil
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from mtlxray.checkpoint import find_resume
from mtlxray.errors import ConfigError, MtlxError
from mtlxray.io import write_json_atomic
from mtlxray.launch.chain import PhasePlan, plan_chain, validate_chain
from mtlxray.launch.slurm import sbatch_flags, slurm_parameters
from mtlxray.launch.submit import Phase, Pipeline, SubmitError, TrainingFailed, TrainJob, _sbatch_test_only
from mtlxray.train.logs import mlflow_uri
from mtlxray.train.rundir import clear_previous_run

__all__ = ["Point", "Element", "Sweep", "SweepPhaseJob", "parse_grid", "plan_sweep", "run_sweep", "core_slots"]

logger = logging.getLogger(__name__)

FINISHED, QUEUED, FAILED, PENDING = "FINISHED", "QUEUED", "FAILED", "PENDING"
_SAVE_LOCK = threading.Lock()
_ACTIVE_SLURM = {"PENDING", "RUNNING", "REQUEUED", "RESIZING", "SUSPENDED", "CONFIGURING", "COMPLETING"}


@dataclass(frozen=True)
class Point:
    """One setting of the grid: its folder name and the overrides that make it."""

    name: str
    overrides: tuple[str, ...]


def _split_values(text: str) -> list[str]:
    """`a,b,[1,2]` -> ['a', 'b', '[1,2]']: commas inside brackets belong to the value."""
    values, depth, current = [], 0, ""
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        if ch == "," and depth == 0:
            values.append(current)
            current = ""
        else:
            current += ch
    values.append(current)
    return [v.strip() for v in values]


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def parse_grid(items: Sequence[str]) -> list[Point]:
    """The points of `--grid key=v1,v2 ...`: the product of the axes, in order; one point `base` without a grid.

    A point is named `<leaf>-<value>` per axis joined by `_` (`precision-bf16_lr-0.001`)."""
    axes: list[tuple[str, list[str]]] = []
    for item in items:
        key, sep, text = item.partition("=")
        values = _split_values(text) if sep else []
        if not key or not values or any(not v for v in values):
            raise ConfigError(f"--grid {item!r}: expected key=value1,value2,... (e.g. run.precision=fp32,bf16)")
        if key in (k for k, _ in axes):
            raise ConfigError(f"--grid: {key} given twice")
        if len(set(values)) != len(values):
            raise ConfigError(f"--grid {item!r}: a value is repeated")
        axes.append((key, values))
    if not axes:
        return [Point("base", ())]
    points = []
    for combo in itertools.product(*(values for _, values in axes)):
        name = "_".join(f"{_slug(key.rsplit('.', 1)[-1])}-{_slug(v)}" for (key, _), v in zip(axes, combo))
        points.append(Point(name, tuple(f"{key}={v}" for (key, _), v in zip(axes, combo))))
    if len({p.name for p in points}) != len(points):
        raise ConfigError("--grid: two points get the same folder name; use values that differ in letters or digits")
    return points


@dataclass
class Element:
    """One (point, seed): a whole chain in `dir`, then its evaluations."""

    point: Point
    seed: int
    dir: Path
    plans: list[PhasePlan]
    eval_subsets: list[str]
    eval_split: str
    eval_bootstrap: int = 1000
    state: str = PENDING
    job_ids: Optional[list[Optional[str]]] = None

    @property
    def key(self) -> str:
        return f"{self.point.name}/seed{self.seed}"

    def eval_dir(self, subset: str) -> Path:
        return self.dir / f"eval-{subset}"

    def evaluate_args(self, subset: str) -> list[str]:
        """`mtlxray evaluate` arguments for the last phase's best checkpoint on one subset."""
        last = self.plans[-1]
        return ["evaluate", "--checkpoint", str(last.best_checkpoint), "--shards", str(last.cfg.data.shards),
                "--split", self.eval_split, "--subset", subset, "--out", str(self.eval_dir(subset)),
                "--bootstrap", str(self.eval_bootstrap)]

    def finished(self) -> bool:
        return (all(p.best_checkpoint.exists() for p in self.plans)
                and all((self.eval_dir(s) / "metrics.json").is_file() for s in self.eval_subsets))


@dataclass
class Sweep:
    name: str
    out: Path
    configs: list[str]
    seeds: list[int]
    grid: list[str]
    overrides: list[str]
    executor: str
    points: list[Point]
    elements: list[Element]
    eval_subsets: list[str]
    eval_split: str
    slurm_params: dict[str, Any]
    arrays: Optional[list[dict]] = None

    def record(self) -> dict:
        return {
            "name": self.name, "out": str(self.out), "configs": self.configs, "seeds": self.seeds,
            "grid": self.grid, "overrides": self.overrides, "executor": self.executor,
            "eval_subsets": self.eval_subsets, "eval_split": self.eval_split,
            "points": [{"name": p.name, "overrides": list(p.overrides)} for p in self.points],
            "elements": [{"point": e.point.name, "seed": e.seed, "dir": str(e.dir), "state": e.state,
                          "job_ids": e.job_ids, "runs": [str(p.run_dir) for p in e.plans]} for e in self.elements],
            "arrays": self.arrays or [],
        }

    def save(self) -> None:
        with _SAVE_LOCK:  # local worker slots save as their elements end
            write_json_atomic(self.out / "sweep.json", self.record(), indent=1)

    def describe(self) -> str:
        """The points, every element's state, and the jobs a run would submit."""
        lines = [f"# sweep {self.name}: {len(self.points)} point(s) x {len(self.seeds)} seed(s), "
                 f"{len(self.elements[0].plans)} phase(s) each, executor {self.executor}"]
        for p in self.points:
            lines.append(f"# point {p.name}: {' '.join(p.overrides) or '(the configs as they are)'}")
        todo = [e for e in self.elements if e.state == PENDING]
        for e in self.elements:
            lines.append(f"{e.key}\t{e.state}\t{e.dir}")
        if not todo:
            return "\n".join(lines + ["# nothing to run"]) + "\n"
        for k, plan in enumerate(todo[0].plans, start=1):
            label = f"# phase {k} ({Path(plan.config).name}): {len(todo)} element(s)"
            if self.executor == "slurm":
                params = _phase_params(plan, self.slurm_params, self.name, k)
                array = f"--array=0-{len(todo) - 1}%{params['slurm_array_parallelism']}"
                dep = [f"--dependency=aftercorr:<phase{k - 1}>"] if k > 1 else []
                lines += [label, " ".join(["sbatch", *sbatch_flags(_without_array(params)), array, *dep])]
            else:
                lines.append(label)
        if self.executor == "local":
            lines.append(f"# local: each element trains its phases, then evaluates {', '.join(todo[0].eval_subsets)} "
                         f"({todo[0].eval_split}), in one of the --jobs slots")
        return "\n".join(lines) + "\n"


def _without_array(params: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in params.items() if k != "slurm_array_parallelism"}


def _phase_params(plan: PhasePlan, slurm_params: dict[str, Any], name: str, k: int) -> dict[str, Any]:
    params = slurm_parameters(plan.cfg.launch, overrides=slurm_params)
    params.setdefault("name", f"mtlx-{name}-p{k}")
    params.setdefault("slurm_array_parallelism", 256)
    return params


def plan_sweep(configs: Sequence[str | Path], out: str | Path, seeds: Sequence[int], grid: Sequence[str] = (),
               overrides: Sequence[str] = (), executor: Optional[str] = None,
               eval_subsets: Sequence[str] = (), eval_split: str = "test", eval_bootstrap: int = 1000,
               slurm_params: Optional[dict[str, Any]] = None) -> Sweep:
    """Every element's chain, checked (`validate_chain`); each element's state read from its folder."""
    if not seeds:
        raise ConfigError("--seeds: give at least one seed")
    if len(set(seeds)) != len(seeds):
        raise ConfigError("--seeds: a seed is repeated")
    out = Path(out).resolve()
    name = out.name
    points = parse_grid(grid)
    overrides = list(overrides)
    first = plan_chain(configs, overrides)[0].cfg
    kind = executor or first.launch.executor
    if kind not in ("slurm", "local"):
        raise ConfigError(f"executor must be `slurm` or `local`, got {kind!r}")
    common = [f"run.experiment={name}"]
    if first.run.mlflow_uri is None:  # one store for the whole sweep, beside sweep.json
        common.append(f"run.mlflow_uri=sqlite:///{out / 'mlflow.db'}")
    elements = []
    for point in points:
        for seed in seeds:
            edir = out / point.name / f"seed{seed}"
            over = [*overrides, *point.overrides, f"run.seed={seed}", f"run.output_dir={edir}", *common]
            try:
                names = [p.cfg.run.name for p in plan_chain(configs, over)]
                run_names = [f"{point.name}-seed{seed}" + (f"-{n}" if len(names) > 1 else "") for n in names]
                per_phase = {k: [f"run.tracker_run_name={n}"] for k, n in enumerate(run_names, start=1)}
                plans = validate_chain(configs, over, per_phase)
            except MtlxError as e:
                raise type(e)(f"point {point.name}, seed {seed}: {e}") from None
            subsets = list(eval_subsets) or [_default_subset(plans[-1])]
            elements.append(Element(point, int(seed), edir, plans, subsets, eval_split, eval_bootstrap))
    sweep = Sweep(name, out, [str(Path(c).resolve()) for c in configs], [int(s) for s in seeds], list(grid),
                  overrides, kind, points, elements, elements[0].eval_subsets, eval_split, dict(slurm_params or {}))
    _read_states(sweep)
    return sweep


def _default_subset(plan: PhasePlan) -> str:
    """The subset `mtlxray evaluate` picks for a checkpoint of this phase."""
    return "infection" if plan.cfg.phase.name == "phase2" else "lung"


def _read_states(sweep: Sweep) -> None:
    """FINISHED from the folders; QUEUED where an earlier run's Slurm jobs are still queued or running."""
    previous: dict[str, dict] = {}
    path = sweep.out / "sweep.json"
    if path.is_file():
        try:
            previous = {f"{e['point']}/seed{e['seed']}": e for e in json.loads(path.read_text())["elements"]}
        except (OSError, ValueError, KeyError) as e:
            raise ConfigError(f"{path}: unreadable ({e}); move it away to start the sweep's record afresh") from None
    for element in sweep.elements:
        before = previous.get(element.key, {})
        element.job_ids = before.get("job_ids")
        if element.finished():
            element.state = FINISHED
        elif element.job_ids and _slurm_active([j for j in element.job_ids if j]):
            element.state = QUEUED
        else:
            element.state = PENDING


def _slurm_active(job_ids: list[str]) -> bool:
    """Whether any of these Slurm jobs is still queued or running (sacct; False without Slurm)."""
    if not job_ids or shutil.which("sacct") is None:
        return False
    res = subprocess.run(["sacct", "-n", "-X", "-P", "-o", "JobID,State", "-j", ",".join(job_ids)],
                         capture_output=True, text=True, timeout=60)
    states = [line.split("|")[1].split()[0] for line in res.stdout.splitlines() if "|" in line]
    return any(s in _ACTIVE_SLURM for s in states)


# ------------------------------------------------------------------------------------------------
# local


def core_slots(jobs: int, cores: Optional[Sequence[int]] = None) -> list[list[int]]:
    """`jobs` disjoint shares of the cores this process may use (a share per slot; shared if too few)."""
    cores = sorted(cores if cores is not None else os.sched_getaffinity(0))
    if jobs <= len(cores):
        size = len(cores) // jobs
        return [cores[i * size:(i + 1) * size] if i < jobs - 1 else cores[i * size:] for i in range(jobs)]
    return [[cores[i % len(cores)]] for i in range(jobs)]


def _run_element_local(element: Element, cores: list[int], cwd: Path) -> str:
    """The element's phases and evaluations in a child process pinned to `cores` (OMP threads = their number),
    one interpreter for all of them (`mtlxray.cli.sequence`)."""
    log = element.dir / "sweep.log"
    element.dir.mkdir(parents=True, exist_ok=True)
    commands = [["train", "--config", plan.config, *plan.overrides] for plan in element.plans]
    commands += [element.evaluate_args(subset) for subset in element.eval_subsets]
    env = {**os.environ, "OMP_NUM_THREADS": str(len(cores)), "PYTHONUNBUFFERED": "1"}
    with open(log, "a") as f:
        f.write(f"# {time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        f.flush()
        rc = subprocess.run([sys.executable, "-m", "mtlxray.cli.sequence", json.dumps(commands)], env=env, cwd=cwd,
                            stdout=f, stderr=subprocess.STDOUT,
                            preexec_fn=lambda: os.sched_setaffinity(0, cores)).returncode
    if rc != 0:
        logger.error("%s: exited %d (log %s)", element.key, rc, log)
        return FAILED
    return FINISHED


def _run_local(sweep: Sweep, todo: list[Element], jobs: int) -> None:
    slots: queue.Queue = queue.Queue()
    for share in core_slots(jobs):
        slots.put(share)
    cwd = Path.cwd()

    def run(element: Element) -> None:
        cores = slots.get()
        try:
            logger.info("%s: running in %s on cores %s", element.key, element.dir, cores)
            element.state = _run_element_local(element, cores, cwd)
            logger.info("%s: %s", element.key, element.state)
        finally:
            slots.put(cores)
            sweep.save()

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(run, todo))


# ------------------------------------------------------------------------------------------------
# Slurm


def _checked_array_params(sweep: Sweep, todo: list[Element]) -> list[dict]:
    """Each phase's submitit parameters, put to `sbatch --test-only` (a request Slurm can never run fails now)."""
    params_by_phase = []
    for k, plan in enumerate(todo[0].plans, start=1):
        params = _phase_params(plan, sweep.slurm_params, sweep.name, k)
        _sbatch_test_only(Phase(plan, _without_array(params)))
        params_by_phase.append(params)
    return params_by_phase


def _submit_arrays(sweep: Sweep, todo: list[Element], params_by_phase: list[dict]) -> list:
    """One job array per phase over `todo`, phase k+1 `aftercorr` on phase k; returns the jobs per phase."""
    import submitit
    from submitit.core.utils import FailedJobError

    folder = sweep.out / "submitit"
    n_phases = len(params_by_phase)
    arrays: list[list] = []
    sweep.arrays = []
    try:
        for k, params in enumerate(params_by_phase):
            params = dict(params)
            if arrays:
                array_id = arrays[-1][0].job_id.split("_")[0]
                params["slurm_additional_parameters"] = {**params.get("slurm_additional_parameters", {}),
                                                         "dependency": f"aftercorr:{array_id}"}
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm")
            executor.update_parameters(**params)
            last = k == n_phases - 1
            # One Checkpointable per element (its own resubmission on preemption), so the array is
            # built with executor.batch(), which submits the same sbatch --array as map_array.
            try:
                with contextlib.redirect_stderr(io.StringIO()), executor.batch():
                    jobs = [executor.submit(SweepPhaseJob(e.plans[k].config, list(e.plans[k].overrides), "auto",
                                                          str(Path.cwd()),
                                                          [e.evaluate_args(s) for s in e.eval_subsets] if last else []))
                            for e in todo]
            except FailedJobError as e:
                raise SubmitError(f"phase {k + 1}: sbatch failed: {str(e).strip().splitlines()[-1]}") from None
            arrays.append(jobs)
            sweep.arrays.append({"phase": k + 1, "job_id": jobs[0].job_id.split("_")[0],
                                 "elements": [e.key for e in todo]})
            logger.info("phase %d: job array %s of %d element(s)", k + 1, sweep.arrays[-1]["job_id"], len(jobs))
    except BaseException:
        for jobs in arrays:  # half a sweep's arrays would leave dependents pending forever
            for job in jobs:
                job.cancel(check=False)
        raise
    for i, element in enumerate(todo):
        element.job_ids = [jobs[i].job_id for jobs in arrays]
        element.state = QUEUED
    return arrays


def _wait_slurm(sweep: Sweep, todo: list[Element], arrays: list) -> None:
    """Wait for every element's chain (a failed phase cancels its own later phases only)."""
    for i, element in enumerate(todo):
        phases = [Phase(plan, {}, jobs[i]) for plan, jobs in zip(element.plans, arrays)]
        reports = Pipeline(phases, sweep.out / "submitit", "slurm").wait()
        for report in reports:
            if report.state != "COMPLETED":
                logger.error("%s: %s", element.key, report)
        element.state = FINISHED if all(r.state == "COMPLETED" for r in reports) and element.finished() else FAILED
        sweep.save()


class SweepPhaseJob(TrainJob):
    """A sweep element's phase as a Slurm array task: `TrainJob`, then (last phase) its evaluations."""

    def __init__(self, config: str, overrides: Sequence[str] = (), resume: str = "auto",
                 workdir: Optional[str] = None, evaluations: Sequence[Sequence[str]] = ()) -> None:
        super().__init__(config, overrides, resume, workdir)
        self.evaluations = [list(a) for a in evaluations]

    def __call__(self) -> str:
        import submitit

        run_dir = super().__call__()
        if submitit.JobEnvironment().global_rank == 0:
            for args in self.evaluations:
                # A fresh process: the evaluation builds its own accelerator state.
                rc = subprocess.run([sys.executable, "-m", "mtlxray", *args], cwd=self.workdir).returncode
                if rc != 0:
                    raise TrainingFailed(f"mtlxray {' '.join(args)} exited {rc}")
        return run_dir

    def checkpoint(self, *args: Any, **kwargs: Any):
        import submitit

        return submitit.helpers.DelayedSubmission(
            SweepPhaseJob(self.config, self.overrides, "auto", self.workdir, self.evaluations))


# ------------------------------------------------------------------------------------------------


def _prepare_tracker_store(sweep: Sweep) -> None:
    """With MLflow among the trackers: the store and the sweep's experiment, made once before the elements
    start (several elements creating a fresh SQLite store at once race on its schema)."""
    cfg = sweep.elements[0].plans[0].cfg
    if "mlflow" not in cfg.run.trackers:
        return

    try:
        import mlflow
    except ImportError:
        raise ConfigError("run.trackers: mlflow needs the `mlflow` package: pip install 'mtlxray[track]'") from None
    sweep.out.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(mlflow_uri(cfg.run))
    if mlflow.get_experiment_by_name(sweep.name) is None:
        mlflow.create_experiment(sweep.name)


def reset_for_rerun(element: Element) -> None:
    """Before an element runs again: from its first phase with no checkpoint to resume, the phases start
    afresh (a later phase must start from the redone one's new best), and its evaluations are redone.

    Earlier phases resume (`--resume auto`): a finished one ends at once."""
    redo = False
    for plan in element.plans:
        redo = redo or find_resume(plan.run_dir / "checkpoints") is None
        if redo:
            clear_previous_run(plan.run_dir, overwrite=True)  # no half of an old run mixed into the new one
    for subset in element.eval_subsets:
        shutil.rmtree(element.eval_dir(subset), ignore_errors=True)


def run_sweep(sweep: Sweep, *, jobs: int = 1, wait: bool = True) -> Sweep:
    """Run (local) or submit (Slurm) the elements that are neither finished nor queued; update sweep.json."""
    todo = [e for e in sweep.elements if e.state == PENDING]
    skipped = [e for e in sweep.elements if e.state != PENDING]
    for e in skipped:
        logger.info("%s: %s, skipped", e.key, e.state.lower())
    sweep.out.mkdir(parents=True, exist_ok=True)
    if not todo:
        sweep.save()
        return sweep
    if sweep.executor == "slurm" and shutil.which("sbatch") is None:
        raise ConfigError("executor=slurm: `sbatch` is not on PATH (not a Slurm login node?); use --executor local")
    params_by_phase = _checked_array_params(sweep, todo) if sweep.executor == "slurm" else []
    _prepare_tracker_store(sweep)
    for element in todo:
        reset_for_rerun(element)
    sweep.save()
    if sweep.executor == "local":
        _run_local(sweep, todo, jobs)
    else:
        arrays = _submit_arrays(sweep, todo, params_by_phase)
        sweep.save()
        if wait:
            _wait_slurm(sweep, todo, arrays)
    sweep.save()
    return sweep

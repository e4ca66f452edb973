"""`mtlxray submit`, `mtlxray sweep` and `mtlxray slurm-scripts`."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from mtlxray.cli.common import EPILOG, config_args, positive_int
from mtlxray.errors import ConfigError


def add_submit_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "submit", help="submit a chain of phases (phase1 -> phase2 -> ...) with submitit (Slurm or local)",
        description="Submit one job per config with submitit; each later config runs with "
                    "--dependency=afterok on the previous one and starts from its best checkpoint. "
                    "Before anything is submitted, every phase's config, shards and phase.init_from are "
                    "checked and, on Slurm, every job is put to `sbatch --test-only`. "
                    "Jobs save and requeue on timeout or preemption. Resource options apply to every job "
                    "and override the configs' launch: sections.")
    config_args(p)
    p.add_argument("--then", action="append", default=[], metavar="YAML",
                   help="a config to run after the previous one succeeds, from its best checkpoint "
                        "(repeatable: --then b.yaml --then c.yaml ...)")
    p.add_argument("--executor", choices=["slurm", "local"], default=None,
                   help="default: launch.executor from the config")
    p.add_argument("--nodes", type=int, default=None, help="nodes per job (default: launch.nodes)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node, one training process each; 0 for CPU nodes (default: launch.gpus_per_node)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per training process, its data workers included (default: launch.cpus_per_task)")
    p.add_argument("--mem", default=None, metavar="SIZE",
                   help="memory per node, e.g. 64G or 500M; a bare number is MB as for sbatch "
                        "(default: launch.mem_gb, or the cluster's default)")
    p.add_argument("--time", default=None, metavar="TIME",
                   help="time limit per job in Slurm's format: minutes, H:M:S, D-H or D-H:M:S "
                        "(default: launch.timeout_min)")
    p.add_argument("--timeout-min", type=int, default=None, help="time limit per job in minutes (or use --time)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: launch.partition)")
    p.add_argument("--account", default=None, help="Slurm account to charge (default: launch.account)")
    p.add_argument("--qos", default=None, help="Slurm quality of service (default: launch.qos)")
    p.add_argument("--folder", default=None, help="submitit log folder (default runs/<name>/submitit)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the chain and print every job's sbatch options; submit nothing")
    p.add_argument("--wait", action="store_true",
                   help="wait for the chain (every task of multi-node jobs) and report each phase's state; "
                        "exit 1 unless all completed")
    p.set_defaults(handler=submit)


def add_sweep_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "sweep", help="a chain of phases over seeds x a grid of settings (Slurm job arrays or local workers)",
        description="Run the chain --config [--then ...] once per point of the grid and seed, each in "
                    "OUT/<point>/seed<k>/, then evaluate each one's best checkpoint on the test split (per-image "
                    "records kept). Slurm: one job array per phase, phase k+1 depending element by element on "
                    "phase k (aftercorr). Local: --jobs worker slots, each pinned to its share of the cores. The "
                    "whole sweep is checked before anything runs; OUT/sweep.json records points, job ids and "
                    "states. Running the same command again skips finished elements and reruns failed or missing "
                    "ones. Aggregate with `mtlxray compare --sweep OUT` (docs/sweeps.md). KEY=VALUE overrides apply to every "
                    "element; write them last (after --out DIR), not right after --seeds.",
        epilog=EPILOG)
    config_args(p)
    p.add_argument("--then", action="append", default=[], metavar="YAML",
                   help="a later phase, started from the previous one's best checkpoint (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", required=True, metavar="SEED", help="training seeds (run.seed)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis of settings, e.g. run.precision=fp32,bf16 (repeatable: the points are the "
                        "product of the axes; commas inside [...] belong to a value)")
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep's folder; its name names the sweep")
    p.add_argument("--executor", choices=["slurm", "local"], default=None,
                   help="default: launch.executor from the config")
    p.add_argument("--jobs", type=positive_int, default=1, metavar="N",
                   help="local: elements run at once, each pinned to 1/N of the cores (default 1)")
    p.add_argument("--array-parallelism", type=positive_int, default=None, metavar="N",
                   help="Slurm: elements of one array running at once (--array=...%%N; default 256)")
    p.add_argument("--eval-subset", action="append", default=[], choices=["lung", "infection"],
                   help="subset(s) to evaluate each element on (repeatable; default: the last phase's subset)")
    p.add_argument("--eval-split", default="test", help="split to evaluate (default test)")
    p.add_argument("--eval-bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of each evaluation's own intervals (default 1000; `compare --sweep` "
                        "draws its own)")
    p.add_argument("--nodes", type=int, default=None, help="Slurm: nodes per job (default: launch.nodes)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="Slurm: GPUs per node (default: launch.gpus_per_node)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="Slurm: CPUs per task (default: launch.cpus_per_task)")
    p.add_argument("--time", default=None, metavar="TIME", help="Slurm: time limit per job (default: launch.timeout_min)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: launch.partition)")
    p.add_argument("--wait", action="store_true",
                   help="Slurm: wait for every element and record its final state (local always waits)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the whole sweep, print the points, the elements' states and the jobs; run nothing")
    p.set_defaults(handler=sweep)


def add_slurm_scripts_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "slurm-scripts", help="write the sbatch scripts (phase1.sh, phase2.sh, pipeline.sh, train.sh) into a folder",
        description="Write the package's sbatch scripts into OUT, ready to submit from there with an installed "
                    "package (`cd OUT && sbatch phase1.sh`, `bash pipeline.sh`): they find each other in OUT, "
                    "activate this virtual environment unless MTLX_VENV names another, and read shipped configs "
                    "by name. Also makes OUT/runs for the job logs. Existing scripts of these names are replaced.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the scripts into (created)")
    p.add_argument("--venv", default=None,
                   help="virtual environment the jobs activate by default (default: the one running this command)")
    p.set_defaults(handler=slurm_scripts)


def launch_params(*, nodes: int | None = None, gpus_per_node: int | None = None,
                  cpus_per_task: int | None = None, time: str | None = None, timeout_min: int | None = None,
                  mem: str | None = None, **slurm: object) -> dict[str, object]:
    """The resource options given on the command line as submitit parameters (the configs' launch:
    sections fill in the rest); `slurm` (partition, account, ...) become `slurm_<key>`."""
    from mtlxray.launch.slurm import parse_mem_gb, parse_slurm_time

    params: dict[str, object] = {k: v for k, v in
                              (("nodes", nodes), ("gpus_per_node", gpus_per_node), ("cpus_per_task", cpus_per_task))
                              if v is not None}
    if time is not None and timeout_min is not None:
        raise ConfigError("give --time or --timeout-min, not both")
    if time is not None:
        params["timeout_min"] = parse_slurm_time(time)
    elif timeout_min is not None:
        params["timeout_min"] = timeout_min
    if mem is not None:
        params["mem_gb"] = parse_mem_gb(mem)
    params.update({f"slurm_{k}": v for k, v in slurm.items() if v is not None})
    return params


def _print_line(line: str) -> None:
    print(line, flush=True)


def submit(args: argparse.Namespace) -> int:
    """`mtlxray submit --config C [--then C2 ...]`."""
    from mtlxray.launch.submit import submit_pipeline

    params = launch_params(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                           time=args.time, timeout_min=args.timeout_min, mem=args.mem, partition=args.partition,
                           account=args.account, qos=args.qos)
    pipeline = submit_pipeline([args.config, *args.then], executor=args.executor, overrides=args.overrides,
                               folder=args.folder, dry_run=args.dry_run, relay=_print_line, **params)
    if args.dry_run:
        sys.stdout.write(pipeline.describe())
        return 0
    for phase in pipeline.phases:
        job_id = phase.job.job_id if phase.job else "-"
        sys.stdout.write(f"{Path(phase.config).name}\t{job_id}\t{phase.run_dir}\n")
    sys.stdout.flush()
    if not args.wait:
        return 0
    reports = pipeline.wait()
    for report in reports:
        sys.stdout.write(f"{report}\n")
    return 0 if all(r.state == "COMPLETED" for r in reports) else 1


def sweep(args: argparse.Namespace) -> int:
    """`mtlxray sweep --config C [--then C2 ...] --seeds S... [--grid k=v1,v2 ...] --out DIR`."""
    from mtlxray.launch.sweep import FAILED, FINISHED, plan_sweep, run_sweep

    params = launch_params(nodes=args.nodes, gpus_per_node=args.gpus_per_node, cpus_per_task=args.cpus_per_task,
                           time=args.time, partition=args.partition, array_parallelism=args.array_parallelism)
    t0 = time.perf_counter()
    plan = plan_sweep([args.config, *args.then], args.out, args.seeds, args.grid, args.overrides, args.executor,
                      args.eval_subset, args.eval_split, args.eval_bootstrap, params)
    if args.dry_run:
        sys.stdout.write(plan.describe())
        return 0
    run_sweep(plan, jobs=args.jobs, wait=plan.executor == "local" or args.wait)
    for e in plan.elements:
        sys.stdout.write(f"{e.key}\t{e.state}\t{' '.join(j or '-' for j in e.job_ids or []) or '-'}\t{e.dir}\n")
    done = sum(e.state == FINISHED for e in plan.elements)
    sys.stdout.write(f"{done}/{len(plan.elements)} element(s) finished in {time.perf_counter() - t0:.0f} s; "
                     f"record in {plan.out / 'sweep.json'}\n")
    if done == len(plan.elements):
        sys.stdout.write(f"aggregate: mtlxray compare --sweep {plan.out}\n")
    failed = any(e.state == FAILED for e in plan.elements)
    return 1 if failed else 0


def slurm_scripts(args: argparse.Namespace) -> int:
    from mtlxray.launch.scripts import current_venv, write_slurm_scripts

    venv = Path(args.venv).resolve() if args.venv else current_venv()
    for path in write_slurm_scripts(args.out, venv):
        print(path)
    if venv is None:
        print("slurm-scripts: not run from a virtual environment: the jobs use the `python` on their PATH "
              "(set MTLX_VENV, or pass --venv)", file=sys.stderr)
    return 0

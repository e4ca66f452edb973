"""`mtlxray train`."""

from __future__ import annotations

import argparse
import logging

from mtlxray.cli.common import config_args
from mtlxray.errors import ConfigError

TRAIN_EPILOG = ("Exit codes: 0 finished, 1 bad input or failed run, 2 usage or config error, 75 saved `last` "
                "after SIGUSR1/SIGUSR2/SIGTERM and wants a requeue (run again with --resume auto).")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "train", help="train one phase (works under accelerate launch, torchrun and srun)",
        description="Train one phase as configured. Run it plainly for one process, or under "
                    "`accelerate launch`, `torchrun` or `srun` for many. On SIGUSR2 (Slurm preemption), "
                    "SIGUSR1 or SIGTERM it saves `last` and exits 75 so a launcher can requeue it.",
        epilog=TRAIN_EPILOG)
    config_args(p)
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto (default): continue from the run's newest complete checkpoint if any; "
                        "none: start fresh (refused in a run folder that already holds a run, unless "
                        "--overwrite); PATH: a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: delete the earlier run's checkpoints, metrics and TensorBoard "
                        "logs in runs/<run.name> first")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config differs from the checkpoint's in settings that change "
                        "the training (refused otherwise, naming them); schedule.epochs/max_steps, logging, "
                        "run.eval_every/save_every and launch resources may always change")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mtlxray.config import load_config
    from mtlxray.train.main import run_training

    # accelerate logs every file of every checkpoint at INFO; our own checkpoint line says enough.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if args.overwrite and args.resume != "none":
        raise ConfigError("--overwrite replaces an earlier run and goes with `--resume none`")
    if args.allow_config_change and args.resume == "none":
        raise ConfigError("--allow-config-change continues a run with changed settings and goes with "
                          "`--resume auto` or a checkpoint path")
    return run_training(load_config(args.config, args.overrides), resume=args.resume, overwrite=args.overwrite,
                        allow_config_change=args.allow_config_change)

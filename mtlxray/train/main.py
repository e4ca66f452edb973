"""`mtlxray train`: one phase, plain or under accelerate launch / torchrun / srun."""

from __future__ import annotations

import argparse
import logging

from mtlxray.config import Config, load_config
from mtlxray.errors import ConfigError

__all__ = ["run_training", "cli_main"]


def run_training(cfg: Config, resume: str = "auto", overwrite: bool = False,
                 allow_config_change: bool = False) -> int:
    """Train one phase; returns 0 when done or EXIT_REQUEUE (75) after a signal-triggered save.

    resume: `auto` (newest complete checkpoint of the run, if any), `none` (a fresh run; refused
    in a used run folder unless `overwrite`), or a checkpoint path. A resume with a config that
    trains differently from the checkpoint's is refused unless `allow_config_change`."""
    from mtlxray.train.trainer import Trainer

    trainer = Trainer(cfg, resume, overwrite, allow_config_change)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def cli_main(args: argparse.Namespace) -> int:
    # accelerate logs every file of every checkpoint at INFO; our own checkpoint line says enough.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    if args.overwrite and args.resume != "none":
        raise ConfigError("--overwrite replaces an earlier run and goes with `--resume none`")
    if args.allow_config_change and args.resume == "none":
        raise ConfigError("--allow-config-change continues a run with changed settings and goes with "
                          "`--resume auto` or a checkpoint path")
    return run_training(load_config(args.config, args.overrides), args.resume, args.overwrite,
                        args.allow_config_change)

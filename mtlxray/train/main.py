"""`mtlxray train`: one phase, plain or under accelerate launch / torchrun / srun."""

from __future__ import annotations

import argparse
import logging

from mtlxray.config import Config, load_config

__all__ = ["run_training", "cli_main"]


def run_training(cfg: Config, resume: str = "auto") -> int:
    """Train one phase; returns 0 when done or EXIT_REQUEUE (75) after a signal-triggered save."""
    from mtlxray.train.engine import Trainer

    trainer = Trainer(cfg, resume)
    try:
        return trainer.fit()
    finally:
        trainer.close()


def cli_main(args: argparse.Namespace) -> int:
    # accelerate logs every file of every checkpoint at INFO; our own checkpoint line says enough.
    logging.getLogger("accelerate").setLevel(logging.WARNING)
    return run_training(load_config(args.config, args.overrides), args.resume)

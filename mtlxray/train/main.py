"""`mtlxray train`: one phase, plain or under accelerate launch / torchrun / srun."""

from __future__ import annotations

from mtlxray.config import Config

__all__ = ["run_training"]


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


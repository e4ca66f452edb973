"""Preemption signals and non-finite losses, decided identically on every rank.

SIGUSR1 (Slurm's `--signal=B:USR1@T`) and SIGTERM only set a flag. At each step boundary the
ranks all-reduce their flags, so that they all save `last` and exit together with EXIT_REQUEUE.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Optional

import torch

from mtlxray.errors import NonFiniteLossError

__all__ = ["StopFlag", "agree", "NonFiniteGuard"]

logger = logging.getLogger(__name__)


class StopFlag:
    """Set by SIGUSR1/SIGTERM; installs its handlers on construction and restores them on close."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        self._previous = {s: signal.signal(s, self._handle) for s in self.SIGNALS}

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        self.requested = signal.Signals(signum).name
        logger.warning("%s received: saving at the next step boundary", self.requested)

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)


def agree(accelerator, *flags: bool) -> list[bool]:
    """Each flag OR-ed across ranks (one all-reduce for all of them)."""
    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


class NonFiniteGuard:
    """Skips up to `budget` non-finite steps in a run, then raises NonFiniteLossError."""

    def __init__(self, budget: int, skipped: int = 0) -> None:
        self.budget = budget
        self.skipped = skipped

    def skip(self, step: int, losses: dict[str, float]) -> None:
        """Record a non-finite loss at `step` (1-based); raise once the budget is spent."""
        detail = ", ".join(f"{k}={v:.4g}" for k, v in losses.items())
        if self.skipped >= self.budget:
            raise NonFiniteLossError(
                f"non-finite loss at step {step} ({detail}); skip budget run.nan_skip_budget="
                f"{self.budget} spent; the last good checkpoint is kept")
        self.skipped += 1
        logger.warning("non-finite loss at step %d (%s): skipped (%d of %d)", step, detail,
                       self.skipped, self.budget)

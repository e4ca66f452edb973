"""Preemption signals, decided identically on every rank.

SIGUSR2 (the preemption signal of both launch paths, `mtlxray.launch.slurm.PREEMPT_SIGNAL`), SIGUSR1
and SIGTERM only set a flag. `StopFlag.install()` runs first thing in `mtlxray train`, before torch is
imported, so a signal during start-up is recorded, not fatal. The ranks combine their flags at
each log step (`agree`), so they all save `last` at the same step and exit with EXIT_REQUEUE.
"""

from __future__ import annotations

import logging
import signal
from types import FrameType
from typing import Optional

__all__ = ["StopFlag", "agree", "STOP_SIGNALS"]

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM)


class StopFlag:
    """Set by a stop signal; `install()` puts its handlers in place, `close()` restores the previous ones."""

    _installed: Optional["StopFlag"] = None

    def __init__(self) -> None:
        self.requested: Optional[str] = None
        """Name of the first signal received (SIGUSR1, SIGUSR2 or SIGTERM), None before any."""
        self._previous: dict = {}

    @classmethod
    def install(cls) -> "StopFlag":
        """The process's flag, with its handlers installed (idempotent: the trainer reuses the one
        the CLI installed at start-up, keeping any signal it already caught)."""
        if cls._installed is None:
            flag = cls()
            flag._previous = {s: signal.signal(s, flag._handle) for s in STOP_SIGNALS}
            cls._installed = flag
        return cls._installed

    def _handle(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.requested is None:
            self.requested = name
        logger.warning("%s received: saving at the next log step, then exiting for a requeue", name)

    def close(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}
        if StopFlag._installed is self:
            StopFlag._installed = None


def agree(accelerator, *flags: bool) -> list[bool]:
    """Each flag OR-ed across ranks (one all-reduce for all of them, one host read)."""
    import torch

    t = torch.tensor([float(f) for f in flags], device=accelerator.device)
    if accelerator.num_processes > 1:
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]

"""Skipping optimizer steps whose gradients are not finite: exactly, and without waiting for the host.

On the DDP backend the decision stays on the device. The gradient norm (computed for clipping
anyway, and identical on every rank after the all-reduce) gives `found_inf`; the fused AdamW
kernel takes it (the hook torch's GradScaler uses) and leaves parameters, moments and step
counts untouched when it is set. Batch-norm running statistics, which the forward pass has
already updated, are put back from a snapshot taken at the start of the accumulation window.
Skips are counted on the device and read at each log step, where a spent `run.nan_skip_budget`
stops the run. DeepSpeed steps inside its own engine, so there the loss is checked on the host
before backward (one host read per micro-step).
"""

from __future__ import annotations

import logging
from typing import Optional

import torch
from torch import nn

from mtlxray.errors import NonFiniteLossError

__all__ = ["NonFiniteGuard"]

logger = logging.getLogger(__name__)


class NonFiniteGuard:
    """Device-side skip of non-finite steps (see the module docstring)."""

    def __init__(self, model: nn.Module, budget: int, device: torch.device) -> None:
        self.budget = budget
        self.skipped = 0
        """Skips known on the host (as of the last `check`)."""
        self._skipped_t = torch.zeros((), dtype=torch.int64, device=device)
        self._last_bad_step = torch.zeros((), dtype=torch.int64, device=device)
        self._norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
                       and m.track_running_stats]
        self._snapshot: Optional[list[torch.Tensor]] = None

    def state_dict(self) -> dict:
        """The skips of the run so far (as of the last `check`: a save follows a log step's check)."""
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict) -> None:
        """Continue counting from a checkpoint's skips (the budget is for the whole run)."""
        self.skipped = int(state["skipped"])
        self._skipped_t.fill_(self.skipped)

    def _buffers(self) -> list[torch.Tensor]:
        return [b for m in self._norms for b in (m.running_mean, m.running_var, m.num_batches_tracked)
                if b is not None]

    def begin_window(self) -> None:
        """Snapshot the batch-norm statistics before the first forward of an accumulation window."""
        self._snapshot = [b.clone() for b in self._buffers()]

    @staticmethod
    def found_inf(grad_norm: torch.Tensor) -> torch.Tensor:
        """1.0 where the (global) gradient norm is not finite, as the fused optimizers expect it."""
        return (~torch.isfinite(grad_norm)).float().reshape(())

    def arm(self, optimizer: torch.optim.Optimizer, found: torch.Tensor) -> None:
        """Hand `found` to the fused optimizer, which then skips its whole update when it is set."""
        optimizer.found_inf = found.to(torch.float32)

    def after_step(self, found: torch.Tensor, step: torch.Tensor) -> None:
        """Undo the window's batch-norm updates where the step was skipped; count the skip."""
        if self._snapshot is not None:
            skip = found.bool()
            for buf, old in zip(self._buffers(), self._snapshot):
                buf.copy_(torch.where(skip, old, buf))
            self._snapshot = None
        self._skipped_t += found.to(torch.int64)
        self._last_bad_step.copy_(torch.where(found.bool(), step, self._last_bad_step))

    def sync_values(self) -> list[torch.Tensor]:
        """The device values `check` needs, to be read with the rest of a log step's values."""
        return [self._skipped_t.double(), self._last_bad_step.double()]

    def check(self, skipped: float, last_bad_step: float, step: int) -> None:
        """With the values of `sync_values` read back: warn about new skips; raise once over budget."""
        skipped, bad = int(skipped), int(last_bad_step)
        if skipped == self.skipped:
            return
        new = skipped - self.skipped
        self.skipped = skipped
        if skipped > self.budget:
            raise NonFiniteLossError(
                f"non-finite loss or gradients at step {bad} ({skipped} such step(s); run.nan_skip_budget="
                f"{self.budget}); the step was skipped and the last good checkpoint is kept")
        logger.warning("non-finite loss or gradients: %d step(s) skipped up to step %d (%d of %d allowed); "
                       "weights, optimizer state and batch-norm statistics left as they were", new, bad,
                       skipped, self.budget)

    def skip_on_host(self, step: int) -> None:
        """DeepSpeed path: the ranks agreed this micro-step's loss is not finite; count it (or raise)."""
        self._skipped_t += 1
        self._last_bad_step.fill_(step)
        self.check(float(self._skipped_t), float(step), step)

"""Teacher forcing: which samples' infection masks and boxes train the heads, step by step.

MultiCheXNet trains its segmentation and detection heads on positive cases only (here: labels in
`phase.positive_classes`). Because the heads then never see a negative, while at inference a gate
(`mtlxray.eval.gate.Gate`) decides what reaches them, `PositiveSelector` tosses a coin per sample (or,
as the paper does, per batch: `phase.teacher_forcing.per`): with probability p the ground truth decides whether the sample reaches the infection
and detection losses, with 1 - p the gate's prediction does - so some negatives that the gate
would pass train the heads to predict nothing on them.

The coins come from a CPU generator seeded by (run.seed, step, batch in epoch, rank): a resumed
run flips exactly the coins the uninterrupted one would have, the global RNG is untouched, and
nothing is read back from the device (the coins travel host -> device).
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import Tensor

from mtlxray.config import Config
from mtlxray.eval.gate import Gate, ground_truth

__all__ = ["coin_flips", "PositiveSelector"]


def _coin_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1, np.uint64)[0] >> 1)


def coin_flips(p: float, n: int, per: str, *, seed: int, step: int, batch: int, rank: int,
               device: torch.device | str) -> Tensor:
    """n bools on `device`, True with probability p (the ground truth decides): one coin per
    sample, or one for the whole batch (`per="batch"`, MultiCheXNet's: the same coin on every rank,
    so the global batch is decided as one). Drawn on the host from a generator seeded by (seed,
    step, batch, and per sample the rank) and copied to the device: the same coins after a resume,
    no read from the device, and the global RNG untouched."""
    g = torch.Generator().manual_seed(_coin_seed(seed, step, batch, rank if per == "sample" else 0))
    u = torch.rand(n if per == "sample" else 1, generator=g)
    return (u < p).expand(n).to(device, non_blocking=True)


class PositiveSelector:
    """Per training micro-step: which samples reach the infection and detection losses."""

    def __init__(self, cfg: Config, gate: Optional[Gate], rank: int) -> None:
        self.tf, self.classes, self.gate = cfg.phase.teacher_forcing, cfg.phase.positive_classes, gate
        self.seed, self.rank = cfg.run.seed, rank

    def select(self, out: dict, batch: dict, *, step: int, batch_index: int) -> Tensor:
        """B bool: the ground truth's positives, or (teacher forcing) per coin the truth's or the gate's."""
        truth = ground_truth(batch["label"], self.classes)
        if self.gate is None:
            return truth
        teacher = coin_flips(self.tf.p, truth.shape[0], self.tf.per, seed=self.seed, step=step, batch=batch_index,
                             rank=self.rank, device=truth.device)
        return torch.where(teacher, truth, self.gate.passes(out, batch["img"]))

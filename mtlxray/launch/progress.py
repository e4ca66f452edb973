"""A submitted training job's progress, relayed to whoever waits for it (`mtlxray submit --wait`,
`mtlxray demo`): one line per new log step and per evaluation, read from the run's metrics.jsonl.

metrics.jsonl rather than the job's log: rank 0 writes it whatever `run.progress` says, in whole
lines, with the step, the planned steps and the loss; a log file mixes in every other message.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Callable, Optional

from mtlxray.train.logs import format_duration

__all__ = ["ProgressRelay", "EVAL_SHOWN"]

EVAL_SHOWN = ("val/loss", "val/lung_dice", "val/inf_dice", "val/accuracy", "val/f1_macro")
"""The validation numbers an evaluation's line shows (those of the training log's own line)."""


class ProgressRelay:
    """Follows one run's metrics.jsonl and writes a line per new record:
    `phase1: step 40/154 (26%), loss 0.4100, elapsed 0:01:10, ETA 0:03:20` and
    `phase1: step 40 validation: val/loss 0.3100, val/lung_dice 0.8120`.

    Lines already in the file when the relay is made (an earlier job of the same run) are not
    shown. A resumed run rewrites the file without the lines after its checkpoint and logs those
    steps again; a step already shown is not shown twice. Elapsed time counts from `start()` (the
    job seen running); the ETA comes from the time between the log steps seen since.
    """

    def __init__(self, metrics: Path, label: str, write: Callable[[str], None], clock=time.time) -> None:
        self.metrics, self.label, self.write, self.clock = Path(metrics), label, write, clock
        self.offset, self.file_id = 0, None
        self.shown: dict[str, int] = {}  # record type -> last step shown
        self.t0: Optional[float] = None
        self.rate_from: Optional[tuple[float, int]] = None  # (time, step) of the first training line shown
        for record in self._new_records():  # an earlier job's lines: the baseline, not news
            kind = record.get("type", "")
            self.shown[kind] = max(self.shown.get(kind, -1), record.get("step", 0))
        self.step0 = max(0, self.shown.get("train", 0))  # where a resumed job starts, near enough

    def start(self) -> None:
        """The job is running: its elapsed time counts from the first call."""
        if self.t0 is None:
            self.t0 = self.clock()

    def poll(self) -> None:
        """Write a line for each record appended since the last poll."""
        for record in self._new_records():
            kind, step = record.get("type", ""), record.get("step", 0)
            if step <= self.shown.get(kind, -1):
                continue
            self.shown[kind] = step
            if kind == "train":
                self.write(self._train_line(record))
            elif kind == "eval":
                shown = ", ".join(f"{k} {record[k]:.4f}" for k in EVAL_SHOWN if record.get(k) is not None)
                self.write(f"{self.label}: step {step} validation: {shown}")

    def _train_line(self, record: dict) -> str:
        self.start()  # a job that ended between two polls was running
        step, total = record["step"], record.get("total_steps", 0)
        now = record.get("time", self.clock())
        # The rate: between training lines once there are two, so that the start-up (data, model)
        # does not count as steps; for the first, from the start.
        since_t, since_step = self.rate_from or (self.t0, self.step0)
        eta = (now - since_t) / (step - since_step) * (total - step) if step > since_step and total else math.nan
        if self.rate_from is None:
            self.rate_from = (now, step)
        loss = record.get("loss")
        return (f"{self.label}: step {step}/{total or '?'} ({100.0 * step / max(1, total):.0f}%), "
                f"loss {'nan' if loss is None else f'{loss:.4f}'}, "
                f"elapsed {format_duration(max(0.0, now - self.t0))}, ETA {format_duration(eta)}")

    def _new_records(self) -> list[dict]:
        """Whole lines appended since the last read (from the start when the file was replaced)."""
        try:
            with self.metrics.open("rb") as f:
                st = os.fstat(f.fileno())
                if (st.st_dev, st.st_ino) != self.file_id or st.st_size < self.offset:
                    self.file_id, self.offset = (st.st_dev, st.st_ino), 0
                f.seek(self.offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1  # a line still being written waits for the next poll
        self.offset += end
        return [json.loads(line) for line in data[:end].splitlines() if line.strip()]

"""A chain of training phases, planned and checked before anything is submitted.

Phase k+1 runs after phase k succeeded and starts from its best checkpoint
(`phase.init_from=<run dir of phase k>/checkpoints/best`). `plan_chain` gives each phase its
overrides and run folder; `validate_chain` checks the whole chain: every config loads, every
phase writes its own run folder, and every phase passes `mtlxray.preflight.check_run` (its shards,
image size, metric, loss weights), where a `phase.init_from` is a checkpoint that exists or one that
an earlier phase of the chain will write. `mtlxray submit`,
`submit_pipeline` and slurm/pipeline.sh (through `python -m mtlxray.cli.chain`) all use it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

from mtlxray.config import Config, load_config
from mtlxray.errors import ConfigError
from mtlxray.preflight import check_run
from mtlxray.resources import find_config

__all__ = ["PhasePlan", "plan_chain", "validate_chain"]


@dataclass(frozen=True)
class PhasePlan:
    """One phase of a chain: its config, the overrides it runs with, and where it writes."""

    index: int
    """1-based position in the chain."""
    config: str
    """Absolute path of the config file."""
    overrides: tuple[str, ...]
    run_dir: Path
    """<run.output_dir>/<run.name> after overrides, absolute."""
    cfg: Config

    @property
    def label(self) -> str:
        return f"phase {self.index} ({Path(self.config).name})"

    @property
    def best_checkpoint(self) -> Path:
        return self.run_dir / "checkpoints" / "best"


def plan_chain(configs: Sequence[str | Path], overrides: Sequence[str] = (),
               phase_overrides: Optional[dict[int, Sequence[str]]] = None) -> list[PhasePlan]:
    """Each phase's overrides (common ones, its own, then init_from) and run folder; configs are loaded.

    `phase_overrides` maps a 1-based phase index to overrides for that phase only.
    """
    if not configs:
        raise ConfigError("a chain needs at least one config")
    phase_overrides = dict(phase_overrides or {})
    unknown = sorted(k for k in phase_overrides if not 1 <= k <= len(configs))
    if unknown:
        raise ConfigError(f"overrides for phase {unknown[0]}, but the chain has {len(configs)} phase(s)")
    plans: list[PhasePlan] = []
    for index, config in enumerate(configs, start=1):
        over = [*overrides, *phase_overrides.get(index, ())]
        if plans:
            over.append(f"phase.init_from={plans[-1].best_checkpoint}")
        try:
            path = find_config(config).resolve()  # a shipped config's name becomes its file for the jobs
            cfg = load_config(path, over)
        except ConfigError as e:
            raise ConfigError(f"phase {index} ({Path(config).name}): {e}") from None
        run_dir = (Path(cfg.run.output_dir) / cfg.run.name).resolve()
        plans.append(PhasePlan(index, str(path), tuple(over), run_dir, cfg))
    return plans


def validate_chain(configs: Sequence[str | Path], overrides: Sequence[str] = (),
                   phase_overrides: Optional[dict[int, Sequence[str]]] = None) -> list[PhasePlan]:
    """`plan_chain`, then check what would otherwise fail on a node; the first problem raises, in one line.

    ConfigError: a config that does not load, two phases writing one run folder, or a phase's
    first `check_run` problem (a `phase.init_from` that is neither a checkpoint now nor written by an
    earlier phase among them). ShardError (or the loader's own error): a phase's shards are missing
    or unreadable.
    """
    plans = plan_chain(configs, overrides, phase_overrides)
    writers: dict[Path, PhasePlan] = {}
    for plan in plans:
        if plan.run_dir in writers:
            raise ConfigError(f"{plan.label} and {writers[plan.run_dir].label} both write {plan.run_dir}: "
                              "give each phase its own run.name")
        writers[plan.run_dir] = plan
        problems = check_run(plan.cfg, written_later=[p.run_dir / "checkpoints" for p in plans[:plan.index - 1]])
        if problems:
            raise problems[0].error(f"{plan.label}: {problems[0]}")
    return plans

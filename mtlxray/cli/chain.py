"""`python -m mtlxray.cli.chain`: validate a chain and print one line per phase (for slurm/pipeline.sh)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from mtlxray.errors import ConfigError, MtlxError
from mtlxray.launch.chain import validate_chain


def main(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m mtlxray.cli.chain",
        description="Validate a chain of phases before submitting it; print, per phase, a tab-separated "
                    "line: index, config, run folder, overrides (space-separated, init_from included).")
    parser.add_argument("configs", nargs="+", metavar="YAML",
                        help="the phases' configs, in order (paths, or names of shipped configs)")
    parser.add_argument("--overrides", default="", help="`key=value` overrides for every phase, space-separated")
    parser.add_argument("--phase-overrides", nargs=2, action="append", default=[], metavar=("K", "OVERRIDES"),
                        help="overrides for phase K only (1-based), space-separated; repeatable")
    args = parser.parse_args(argv)
    try:
        per_phase: dict[int, list[str]] = {}
        for k, text in args.phase_overrides:
            if not k.isdigit():
                raise ConfigError(f"--phase-overrides: phase index {k!r} is not a number")
            per_phase.setdefault(int(k), []).extend(text.split())
        plans = validate_chain(args.configs, args.overrides.split(), per_phase)
    except MtlxError as e:
        print(f"error: {e}", file=sys.stderr)
        return e.exit_code
    for plan in plans:
        print(f"{plan.index}\t{plan.config}\t{plan.run_dir}\t{' '.join(plan.overrides)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

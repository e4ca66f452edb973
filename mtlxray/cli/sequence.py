"""`python -m mtlxray.cli.sequence '<JSON list of argument lists>'`: several `mtlxray` command lines in one
interpreter (a local sweep slot's phases, then its evaluations, paying the start-up once)."""

from __future__ import annotations

import json
import os
import sys
from typing import Sequence

from mtlxray.cli import main


def run_commands(commands: Sequence[Sequence[str]]) -> int:
    """Run `mtlxray` commands one after another in this process; the first non-zero exit stops them.

    One interpreter per element (its phases, then its evaluations) pays the start-up once."""
    print(f"# pid {os.getpid()} on cores {sorted(os.sched_getaffinity(0))}, "
          f"OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}", flush=True)
    for args in commands:
        print(f"$ mtlxray {' '.join(args)}", flush=True)
        rc = main(list(args))
        if rc != 0:
            print(f"mtlxray {args[0]} exited {rc}", flush=True)
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(run_commands(json.loads(sys.argv[1])))

"""`mtlxray doctor`."""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys

from mtlxray.cli.common import config_args
from mtlxray.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "doctor", help="check this node (GPUs, kernels, shards, disk, memory) before submitting a config",
        description="Report torch/CUDA/cuDNN/NCCL versions, the GPUs, which SDPA kernels run the model's window "
                    "attention, DeepSpeed's ops (backend deepspeed), the Slurm variables, the shards, free disk "
                    "and a per-GPU memory projection; then one verdict line per problem. Exit 0 when the config "
                    "can run here, 1 when it cannot, 2 for a config error.")
    config_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(handler=run)


@contextlib.contextmanager
def _stdout_to_stderr(enabled: bool):
    """Send everything written to file descriptor 1 (Python's prints, and C libraries') to stderr."""
    if not enabled:
        yield
        return
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


def run(args: argparse.Namespace) -> int:
    import json

    from mtlxray.config import load_config
    from mtlxray.doctor import diagnose, render

    cfg = load_config(args.config, args.overrides) if args.config else None
    if args.overrides and not args.config:
        raise ConfigError("overrides need --config")
    for name in ("mtlxray", "deepspeed", "accelerate"):  # the report is the output; keep logs out of it
        logging.getLogger(name).setLevel(logging.WARNING)
    with _stdout_to_stderr(args.json):  # DeepSpeed and others print on stdout; --json keeps it for the report
        diag = diagnose(cfg)
    if args.json:
        sys.stdout.write(json.dumps(diag.as_dict(), indent=1, default=str) + "\n")
    else:
        sys.stdout.write(render(diag) + "\n")
    return 0 if diag.ok else 1

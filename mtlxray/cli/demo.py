"""`mtlxray demo`."""

from __future__ import annotations

import argparse

from mtlxray.cli.common import positive_int


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "demo", help="the whole pipeline on synthetic data, ending in a report",
        description="Synthesise data, build shards, train phase 1 then phase 2 through the submitit local "
                    "executor, evaluate, predict on a few test images, and write report.md with figures.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--scale", choices=["tiny", "small"], default="small",
                   help="small: the demo configs on a few hundred phantoms (minutes); tiny: a tiny model for 2 steps "
                        "per phase on a few dozen, to check an installation in seconds (default small)")
    p.add_argument("--config", default=None,
                   help="phase 1 demo config, a file or a shipped config's name; phase 2's is <stem>_phase2 beside "
                        "it (default: the shipped demo)")
    p.add_argument("--bootstrap", type=positive_int, default=1000, metavar="N",
                   help="bootstrap resamples of the evaluations' 95%% CIs (default 1000)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides for both phases, after the demo's own, e.g. schedule.epochs=4")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mtlxray.demo import run_demo

    run_demo(args.out, scale=args.scale, config=args.config, overrides=args.overrides, n_boot=args.bootstrap)
    return 0

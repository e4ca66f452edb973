"""`mtlxray bench`."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from mtlxray.errors import ConfigError

log = logging.getLogger(__name__)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench", help="run benchmark suites (writes runs/bench/<suite>.json)",
        description="Side-by-side performance suites: model, attention, checkpointing, memory, loader, ddp, "
                    "projection, shards, scale (the paper's 39,746 images and a 1M-hash audit: time and peak memory), or all.")
    p.add_argument("suite", nargs="?", default="all",
                   help="model|gpu|attention|checkpointing|memory|loader|ddp|projection|shards|scale|all (default all)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes")
    p.add_argument("--out", default=None,
                   help="results folder (default runs/bench under the working directory)")
    p.add_argument("--update-results", action="store_true",
                   help="write into the tracked benchmarks/results of the mtlxray checkout holding the working "
                        "directory and rewrite the results section of its benchmarks/README.md")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mtlxray.bench.common import Context
    from mtlxray.bench.run import SUITES, default_out, render, run_suite

    names = list(SUITES) if args.suite == "all" else [args.suite]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ConfigError(f"unknown benchmark suite {unknown[0]!r}; choose from {', '.join(SUITES)}, all")
    if args.update_results and args.out:
        raise ConfigError("--update-results writes the checkout's benchmarks/results; it takes no --out")
    ctx = Context(quick=args.quick, out=Path(args.out) if args.out else default_out(args.update_results))
    for name in names:
        data = run_suite(name, ctx)
        print(render(data), flush=True)
        print(flush=True)
    if args.update_results:
        from mtlxray.bench.report import update_readme

        readme = ctx.out.parent / "README.md"
        update_readme(readme, ctx.out, list(SUITES))
        log.info("updated the results section of %s", readme)
    log.info("results in %s", ctx.out)
    return 0

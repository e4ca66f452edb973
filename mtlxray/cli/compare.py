"""`mtlxray compare RUN_DIR...` and `mtlxray compare --sweep DIR`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtlxray.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "compare", help="one table of several runs: test metrics with 95%% CIs, size, GFLOPs, training speed",
        description="Compare runs (training run folders, folders of `evaluate --model-config` results, or "
                    "evaluation folders): each run's evaluation of the split (its eval-*/metrics.json) with "
                    "bootstrap 95% intervals, its parameters and GFLOPs per image (from its config) and its "
                    "measured training images/s (metrics.jsonl). Writes OUT/compare.md and OUT/compare.csv. "
                    "A run without an evaluation of the split is evaluated first when --shards is given "
                    "(its best checkpoint, into OUT/evaluations/<run name>/, never into the run folder), and "
                    "is an error otherwise.")
    p.add_argument("runs", nargs="*", metavar="RUN_DIR", help="run folders (runs/<name>) or evaluation folders")
    p.add_argument("--sweep", default=None, metavar="DIR",
                   help="instead of runs: a folder written by `mtlxray sweep`; per point and metric the seeds' "
                        "values, mean ± sd and 95%% intervals (over seeds, and bootstrapped over images within "
                        "seeds), paired comparisons of points (bootstrap interval and Wilcoxon p), one figure per "
                        "metric; writes DIR/report.md, summary.csv, summary.json and figures/ (docs/sweeps.md)")
    p.add_argument("--pair", nargs=2, action="append", default=None, metavar=("A", "B"),
                   help="with --sweep: compare point A with point B on the same seeds and images (repeatable; "
                        "default: every point against the first)")
    p.add_argument("--out", default=None,
                   help="folder for compare.md and compare.csv (default ./compare); with --sweep, for the report "
                        "(default the sweep's folder)")
    p.add_argument("--split", default="test", help="the evaluated split to compare (default test)")
    p.add_argument("--subset", default=None, help="lung or infection (default: whichever the evaluation used)")
    p.add_argument("--shards", default=None,
                   help="evaluate runs that have no evaluation of the split on these shards first (default: "
                        "such a run is an error naming the `mtlxray evaluate` command)")
    p.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of the evaluations compare runs itself, and of --sweep's intervals "
                        "(default 1000)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    if args.sweep is not None:
        if args.runs:
            raise ConfigError("give run folders or --sweep DIR, not both")
        return compare_sweep(args.sweep, pairs=[tuple(p) for p in args.pair or []], n_boot=args.bootstrap,
                             out=Path(args.out) if args.out is not None else Path(args.sweep))
    if not args.runs:
        raise ConfigError("no runs to compare: give RUN_DIR... or --sweep DIR")
    from mtlxray.io import write_text_atomic
    from mtlxray.report.compare import compare_runs, csv_table, markdown_table

    out = Path(args.out or "compare")
    rows = compare_runs(args.runs, split=args.split, subset=args.subset, shards=args.shards, n_boot=args.bootstrap,
                        evaluations=out / "evaluations")
    md = markdown_table(rows)
    write_text_atomic(out / "compare.md", md)
    write_text_atomic(out / "compare.csv", csv_table(rows))
    print(md)
    print(f"wrote {out / 'compare.md'} and {out / 'compare.csv'}")
    return 0


def compare_sweep(sweep: str, *, pairs: list[tuple[str, str]], n_boot: int, out: Path) -> int:
    """`mtlxray compare --sweep DIR [--pair A B ...] [--bootstrap N] [--out DIR]`."""
    from mtlxray.report.sweep import write_sweep_report

    result = write_sweep_report(sweep, pairs=pairs, n_boot=n_boot, out=out)
    print((out / "report.md").read_text())
    print(f"wrote {out / 'report.md'}, {out / 'summary.csv'}, {out / 'summary.json'} and "
          f"{len(list((out / 'figures').glob('*.png')))} figure(s) in {out / 'figures'}")
    return 0 if result["points"] else 1

"""Suite registry and the `mtlxray bench` entry point: run suites, write JSON, print tables."""

from __future__ import annotations

import argparse
import importlib
import logging
import time
from pathlib import Path

from mtlxray.errors import ConfigError

from mtlxray.bench.common import Context, SuiteResult, SuiteUnavailable, Target, format_table, format_targets
from mtlxray.bench.common import machine_info, write_json_atomic

log = logging.getLogger(__name__)

# Order matters for `all`: projection reads the model and loader results written before it.
SUITES: dict[str, str] = {
    "attention": "mtlxray.bench.attention",
    "model": "mtlxray.bench.model",
    "checkpointing": "mtlxray.bench.checkpointing",
    "loader": "mtlxray.bench.loader",
    "shards": "mtlxray.bench.shards",
    "ddp": "mtlxray.bench.ddp",
    "projection": "mtlxray.bench.projection",
}
DEFAULT_OUT = Path("benchmarks") / "results"
"""Results go to the checkout's benchmarks/results (relative to the working directory) or --out."""
README = Path("benchmarks") / "README.md"


def run_suite(name: str, ctx: Context) -> dict:
    """Run one suite, write `<out>/<name>.json` atomically, and return what was written."""
    module = importlib.import_module(SUITES[name])
    t0 = time.perf_counter()
    try:
        result: SuiteResult = module.run(ctx)
    except SuiteUnavailable as e:
        log.warning("suite %s unavailable: %s", name, e)
        result = SuiteResult(name, status="unavailable", details={"reason": str(e)})
    data = result.as_dict(machine_info(), ctx.quick)
    data["wall_s"] = round(time.perf_counter() - t0, 1)
    write_json_atomic(ctx.out / f"{name}.json", data)
    return data


def render(data: dict) -> str:
    """A suite's JSON as the text printed after it runs."""
    head = f"## {data['suite']} ({data['label']}, {data['status']}, {data['wall_s']} s)"
    if data["status"] == "unavailable":
        return f"{head}\n{data['details'].get('reason', '')}"
    targets = [Target(**{k: v for k, v in t.items() if k != "met"}) for t in data["targets"]]
    parts = [head, format_table(data["rows"])]
    if data["status"] == "partial":
        parts.append(f"partial: {data['details'].get('missing', '')}")
    if targets:
        parts += ["", format_targets(targets)]
    return "\n".join(parts)


def cli_main(args: argparse.Namespace) -> int:
    names = list(SUITES) if args.suite == "all" else [args.suite]
    unknown = [n for n in names if n not in SUITES]
    if unknown:
        raise ConfigError(f"unknown benchmark suite {unknown[0]!r}; choose from {', '.join(SUITES)}, all")
    ctx = Context(quick=args.quick, out=Path(args.out) if args.out else DEFAULT_OUT)
    for name in names:
        data = run_suite(name, ctx)
        print(render(data), flush=True)
        print(flush=True)
    if ctx.out.resolve() == DEFAULT_OUT.resolve() and README.is_file():
        from mtlxray.bench.report import update_readme

        update_readme(README, DEFAULT_OUT, list(SUITES))
        log.info("updated the results section of %s", README)
    return 0

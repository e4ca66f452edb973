"""Suite registry behind `mtlxray bench` (mtlxray/cli/bench.py): run suites, write JSON, render tables.

Results go to `--out`, by default `runs/bench` under the working directory, like every other
command's outputs. The tracked results of the mtlxray checkout (`benchmarks/results/*.json` and
the results section of `benchmarks/README.md`) are rewritten only with `--update-results`, which
needs the working directory inside a checkout (found by walking up to the folder with
`pyproject.toml` and `benchmarks/README.md`). Nothing is ever written inside the installed package.
"""

from __future__ import annotations

import importlib
import logging
import time
from pathlib import Path

from mtlxray.errors import ConfigError
from mtlxray.io import write_json_atomic

from mtlxray.bench.common import Context, SuiteResult, SuiteUnavailable, Target, format_table, format_targets
from mtlxray.bench.common import machine_info

log = logging.getLogger(__name__)

# Order matters for `all`: projection reads the loader results written before it.
SUITES: dict[str, str] = {
    "attention": "mtlxray.bench.attention",
    "model": "mtlxray.bench.model",
    "gpu": "mtlxray.bench.gpu",
    "checkpointing": "mtlxray.bench.recompute",
    "memory": "mtlxray.bench.memory",
    "loader": "mtlxray.bench.loader",
    "shards": "mtlxray.bench.shards",
    "scale": "mtlxray.bench.scale",
    "ddp": "mtlxray.bench.ddp",
    "projection": "mtlxray.bench.projection",
}


def find_checkout(start: Path | None = None) -> Path | None:
    """The mtlxray source checkout holding `start` (default: the working directory), or None."""
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        project = folder / "pyproject.toml"
        if project.is_file() and (folder / "benchmarks" / "README.md").is_file() and \
                'name = "mtlxray"' in project.read_text():
            return folder
    return None


DEFAULT_OUT = Path("runs") / "bench"


def default_out(update_results: bool = False) -> Path:
    """`runs/bench` (relative to the working directory), or with `update_results` the checkout's
    tracked `benchmarks/results`; ConfigError for that outside a checkout."""
    if not update_results:
        return DEFAULT_OUT
    checkout = find_checkout()
    if checkout is None:
        raise ConfigError(f"--update-results: {Path.cwd()} is not inside an mtlxray checkout (no pyproject.toml "
                          "with benchmarks/README.md above it); without it results go to --out (default runs/bench)")
    return checkout / "benchmarks" / "results"


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
    write_json_atomic(ctx.out / f"{name}.json", data, indent=2, default=str)
    return data


def extra_tables(data: dict) -> list[str]:
    """The named tables a suite adds beside its rows (`details["tables"]`: title -> rows)."""
    return [f"{title}\n\n{format_table(rows)}" for title, rows in data["details"].get("tables", {}).items()]


def render(data: dict) -> str:
    """A suite's JSON as the text printed after it runs."""
    head = f"## {data['suite']} ({data['label']}, {data['status']}, {data['wall_s']} s)"
    if data["status"] == "unavailable":
        return f"{head}\n{data['details'].get('reason', '')}"
    targets = [Target(**{k: v for k, v in t.items() if k != "met"}) for t in data["targets"]]
    parts = [head, format_table(data["rows"])]
    if targets:
        parts += ["", format_targets(targets)]
    for table in extra_tables(data):
        parts += ["", table]
    return "\n".join(parts)

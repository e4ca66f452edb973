"""The results section of benchmarks/README.md, rendered from results/*.json: machine and date,
each suite's table, each target met or not, and for unmet targets the profiler's top operators."""

from __future__ import annotations

import json
from pathlib import Path

from mtlxray.bench.common import Target, format_table, format_targets
from mtlxray.io import write_text_atomic

BEGIN, END = "<!-- results:begin -->", "<!-- results:end -->"

# Profiles stored by the suites, shown under a suite that has an unmet target.
_PROFILES = {"model": "profile_top_ops", "loader": "profile_python_hotspots", "ddp": "profile_top_ops_ddp_rank0"}


def _targets(data: dict) -> list[Target]:
    return [Target(**{k: v for k, v in t.items() if k != "met"}) for t in data["targets"]]


def _profiles(data: dict) -> str:
    stored = data["details"].get(_PROFILES.get(data["suite"], ""), None)
    if not stored:
        return ""
    if isinstance(stored, list):
        stored = {data["suite"]: stored}
    parts = []
    for name, ops in stored.items():
        tool = "cProfile, functions by own time" if ops and "function" in ops[0] else \
            "torch.profiler, operators by self CPU time"
        parts.append(f"{tool}, `{name}`:\n\n{format_table(ops)}")
    return "\n\n".join(parts)


def _machine(m: dict) -> str:
    isa = f" ({m['cpu_capability']})" if "cpu_capability" in m else ""
    gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB)" for g in m.get("gpus") or [])
    return (f"{m['cpu']}{isa}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
            f"Python {m['python']}" + (f", GPU: {gpus}, CUDA {m.get('cuda')}" if gpus else ""))


def render(results: Path, order: list[str]) -> str:
    """Markdown for every `<suite>.json` in `results`, in `order`."""
    found = [json.loads((results / f"{n}.json").read_text()) for n in order if (results / f"{n}.json").is_file()]
    if not found:
        return "(no results yet: run `mtlxray bench all`)"
    first = _machine(found[0]["machine"])
    out = [f"Machine: {first}. A shared machine: each suite's heading gives its date and the 1-minute "
           f"load average at its end; absolute figures are noisy, ratios measured side by side are the evidence."]
    for data in found:
        m = data["machine"]
        out.append(f"\n### {data['suite']} ({data['label']}; {m['date']}, load {m['load_avg_1m']}, "
                   f"{'quick, ' if data['quick'] else ''}{data['wall_s']} s)\n")
        if _machine(m) != first:
            out.append(f"Machine: {_machine(m)}.\n")
        if data["status"] == "unavailable":
            out.append(f"Not run: {data['details'].get('reason', '')}")
            continue
        out.append(format_table(data["rows"]))
        for title, rows in data["details"].get("tables", {}).items():
            out.append(f"\n{title}\n\n{format_table(rows)}")
        targets = _targets(data)
        if targets:
            out.append("\n" + format_targets(targets))
            if any(t.met is False for t in targets):
                prof = _profiles(data)
                if prof:
                    out.append("\n" + prof)
    return "\n".join(out)


def update_readme(readme: Path, results: Path, order: list[str]) -> None:
    """Replace the text between the results markers of `readme` (atomically)."""
    text = readme.read_text()
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    write_text_atomic(readme, f"{head}{BEGIN}\n{render(results, order)}\n{END}{tail}")

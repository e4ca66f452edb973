"""The demo's scores over seeds and precisions: `mtlxray demo` once per (precision, seed), each in
its own process and output folder, then a table of lung Dice, infection Dice and accuracy per run,
with the mean and standard deviation of each precision.

    python benchmarks/demo_study.py --seeds 0 1 2 --precisions fp32 bf16 [--configs A.yaml ...]
                                    [--jobs N] [--out DIR]

The seed is the training seed (`run.seed`); the phantoms are the same for every run, so precisions
are compared on the same images. Writes <out>/demo_study.json (atomically) and prints the table.
Runs already finished under <out> are reused (the demo resumes its finished phases).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
COLUMNS = [("lung/lung_dice", "lung Dice"), ("infection/inf_dice", "infection Dice"),
           ("lung/accuracy", "accuracy (lung split)"), ("infection/accuracy", "accuracy (infection split)"),
           ("infection/inf_fp_share", "negatives with infection"), ("train_s", "training s")]
"""Table columns: `<subset>/<metric>` is read from eval-<subset>/metrics.json, `train_s` from the log."""


def run_one(out: Path, config: Path, precision: str, seed: int, threads: int) -> dict:
    folder = out / f"{config.stem}-{precision}-s{seed}"
    folder.mkdir(parents=True, exist_ok=True)
    code = ("import sys; from mtlxray.demo import run_demo; run_demo(sys.argv[1], config=sys.argv[4], "
            "overrides=[f'run.seed={sys.argv[2]}', f'run.precision={sys.argv[3]}'])")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONUNBUFFERED": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    t0 = time.perf_counter()
    with open(folder / "demo.log", "w") as log:
        rc = subprocess.run([sys.executable, "-c", code, str(folder), str(seed), precision, str(config.resolve())],
                            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
    row: dict = {"config": config.stem, "precision": precision, "seed": seed, "rc": rc,
                 "wall_s": round(time.perf_counter() - t0, 1)}
    text = (folder / "demo.log").read_text()
    # The step timings the demo prints: "[3/6] train ... \n      done in 151.2 s"
    train = re.search(r"\] train .*\n(?:.*\n)*?\s+done in ([\d.]+) s", text)
    row["train_s"] = float(train.group(1)) if train else None
    if rc != 0:
        row["error"] = text.strip().splitlines()[-1] if text.strip() else f"exit {rc}"
        return row
    evals = {subset: json.loads((folder / f"eval-{subset}" / "metrics.json").read_text())["metrics"]
             for subset in ("lung", "infection")}
    for key, _ in COLUMNS:
        if "/" in key:
            subset, metric = key.split("/")
            row[key] = evals[subset].get(metric)
    return row


def _fmt(v) -> str:
    return "–" if v is None else f"{v:.3f}" if isinstance(v, float) and abs(v) < 10 else f"{v:g}"


def render(rows: list[dict]) -> str:
    lines = ["| config | precision | seed | " + " | ".join(t for _, t in COLUMNS) + " |",
             "|---|---|---|" + "---:|" * len(COLUMNS)]
    for r in rows:
        cells = [_fmt(r.get(k)) for k, _ in COLUMNS] if r["rc"] == 0 else [f"failed: {r.get('error')}"]
        lines.append(f"| {r['config']} | {r['precision']} | {r['seed']} | " + " | ".join(cells) + " |")
    for config, precision in dict.fromkeys((r["config"], r["precision"]) for r in rows):
        done = [r for r in rows if (r["config"], r["precision"]) == (config, precision) and r["rc"] == 0]
        if not done:
            continue
        cells = []
        for k, _ in COLUMNS:
            vals = [r[k] for r in done if r.get(k) is not None]
            sd = statistics.stdev(vals) if len(vals) > 1 else 0.0
            cells.append("–" if not vals else f"{_fmt(statistics.mean(vals))} ± {_fmt(sd)}")
        lines.append(f"| **{config}** | **{precision}** | mean ± sd ({len(done)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds (default 0 1 2)")
    p.add_argument("--precisions", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16", "auto"],
                   help="run.precision values (default fp32 bf16)")
    p.add_argument("--configs", type=Path, nargs="+", default=[REPO / "configs" / "demo.yaml"],
                   help="phase-1 demo configs, each with its <stem>_phase2.yaml beside it (default configs/demo.yaml)")
    p.add_argument("--jobs", type=int, default=1,
                   help="runs at a time (default 1: on a CPU, parallel runs share the cores and slow each other)")
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 1) // 2),
                   help="OMP threads per run (default half the cores)")
    p.add_argument("--out", type=Path, default=REPO / "runs" / "demo_study", help="output folder")
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jobs = [(c, pr, s) for c in args.configs for pr in args.precisions for s in args.seeds]

    def run_and_record(job: tuple[Path, str, int]) -> dict:
        row = run_one(args.out, *job, args.threads)
        with open(args.out / "rows.jsonl", "a") as f:  # what finished, should the study be stopped early
            f.write(json.dumps(row) + "\n")
        print(json.dumps(row), flush=True)
        return row

    with ThreadPoolExecutor(max(1, args.jobs)) as pool:
        rows = list(pool.map(run_and_record, jobs))
    import torch

    result = {"device": torch.cuda.get_device_name() if torch.cuda.is_available() else
              f"cpu ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()})",
              "torch": torch.__version__, "jobs": args.jobs, "rows": rows}
    tmp = args.out / "demo_study.json.tmp"
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(args.out / "demo_study.json")
    print(f"{result['device']}, torch {result['torch']}, {args.jobs} run(s) at a time\n{render(rows)}")
    return 0 if all(r["rc"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`scale`: the paper's dataset size and 25x beyond, in bounded memory.

- `paper`: the synthetic `paper` scale (39,746 images at 256 px, Tables I and II) is written once,
  then built (`shards build --format raw --workers 2`) and audited (`shards audit`), each in a child
  process: wall time, images/s and peak resident memory. With `--quick` the paper-scale tree holds
  hard links to the `small` scale's 350 rendered images instead (the same files per folder,
  repeated up to the paper's counts: ~114 copies of each image, which the audit reports as groups);
  rendering 39,746 phantoms takes longer than the build it feeds. Then one `evaluate` pass over the
  shards it built (`evaluate_model`, untrained: the pass is measured, not the figures): the demo
  model at 256² over every subset and split, all 39,746 images (`--quick`: a narrower model over
  the infection test split, `QUICK_SPLITS`), with its images/s and peak memory.
- `hashes`: the audit alone (`audit._scan`, what `shards audit` runs after reading manifests) on
  1,000,000 synthetic 256-bit hashes with planted near pairs (distances 1 to the threshold) and one
  group of 50,000 equal hashes: time, peak memory and the recall of the planted pairs.

Each stage runs in a child that imports first, then resets its peak resident size (Linux:
`5 > /proc/self/clear_refs`), so VmHWM is the stage's own peak, imports excluded (torch, imported
through webdataset, peaks near 0.9 GiB while loading and then settles); the pool workers' peak
(RUSAGE_CHILDREN) is reported beside it. The host's load average is recorded with every stage:
the machine may be shared while it runs.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

_CHILD = """
import importlib, json, resource, sys, time
from pathlib import Path
import mtlxray.bench.scale as scale
from mtlxray.resources import proc_status_kib as status
for module in scale.IMPORTS[sys.argv[1]]:
    importlib.import_module(module)

def cpu(who):
    usage = resource.getrusage(who)
    return usage.ru_utime + usage.ru_stime

Path("/proc/self/clear_refs").write_text("5")
base = status("VmRSS")
t0, cpu0 = time.perf_counter(), cpu(resource.RUSAGE_SELF)
extra = scale.stage(sys.argv[1], json.loads(sys.argv[2]))
print("STAGE_RESULT", json.dumps({"seconds": time.perf_counter() - t0, "peak_mib": status("VmHWM") / 1024,
      "base_mib": base / 1024, "workers_peak_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
      "cpu_s": cpu(resource.RUSAGE_SELF) - cpu0, "workers_cpu_s": cpu(resource.RUSAGE_CHILDREN), **extra}),
      flush=True)
"""

IMPORTS = {"build": ["mtlxray.data.shards"], "audit": ["mtlxray.data.audit", "mtlxray.data.loader"],
           "hashes": ["mtlxray.data.audit", "scipy.sparse.csgraph"],
           "evaluate": ["mtlxray.report.evaluate", "mtlxray.data.loader", "mtlxray.model", "mtlxray.config",
                        "accelerate", "matplotlib.pyplot"]}
"""What each stage's child imports before its peak memory is reset."""
HASHES = 1_000_000
EQUAL_GROUP = 50_000
PLANTED = 10_000
SPLITS = [(subset, split) for subset in ("lung", "infection") for split in ("train", "val", "test")]
"""The evaluate stage's passes in a full run: together every image of the set, once."""
QUICK_SPLITS = [("infection", "test")]
"""`--quick`'s evaluate pass: 1,166 images at the paper scale (the model's forward pass, not the
bookkeeping, sets the rate: all 39,746 images would take ~25 min on 2 idle cores)."""
EVAL_MODEL = {"full": ["model.img_size=256"],
              "quick": ["model.img_size=256", "model.embed_dim=12", "model.depths=[1,1]", "model.num_heads=[1,2]",
                        "model.ppm_channels=8", "model.ppm_bins=[1,2]", "model.decoder_channels=[8,4]",
                        "model.cross_attn_heads=[1,1]", "model.head_channels=4", "model.cls_channels=8"]}
"""Overrides of `configs/demo.yaml` for the evaluated model (untrained: the stage measures the pass,
not the figures): the demo model at 256² (`--quick`: two narrow stages, 134 MFLOP an image)."""


def planted_hashes(n: int, equal: int, planted: int, threshold: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """(words (n, 4) uint64, planted pairs (k, 2)): random hashes, the last `equal` rows one hash,
    and `planted` rows each a copy of an earlier row with 1..threshold bits flipped."""
    rng = np.random.default_rng(seed)
    words = rng.integers(0, 2**63, (n, 4), dtype=np.uint64) | (rng.integers(0, 2, (n, 4), dtype=np.uint64) << 63)
    words[n - equal:] = words[n - equal]
    src = np.arange(planted)
    dst = np.arange(planted, 2 * planted)
    bits = np.unpackbits(words[src].view(np.uint8), axis=1)
    for k in range(planted):
        bits[k, rng.choice(256, 1 + k % threshold, replace=False)] ^= 1
    words[dst] = np.packbits(bits, axis=1).view(np.uint64)
    return words, np.stack([src, dst], axis=1)


def linked_tree(small: Path, out: Path, counts: dict) -> int:
    """A COVID-QU-Ex tree with `counts` (subset -> split -> class -> n) images, each a hard link to
    an image (and its masks) of the same folder of the tree `small`; returns the number of images."""
    from mtlxray.data.sources import SPLIT_DIRS, SUBSET_DIRS

    total = 0
    for subset, splits in counts.items():
        top = Path(SUBSET_DIRS[subset]) / SUBSET_DIRS[subset]
        for split, classes in splits.items():
            for cls, n in classes.items():
                folder = top / SPLIT_DIRS[split] / cls
                kinds = sorted(p.name for p in (small / folder).iterdir() if p.is_dir())
                names = sorted(p.name for p in (small / folder / "images").glob("*.png"))
                for kind in kinds:
                    (out / folder / kind).mkdir(parents=True, exist_ok=True)
                    for k in range(n):
                        os.link(small / folder / kind / names[k % len(names)], out / folder / kind / f"copy_{k}.png")
                total += n
    return total


def stage(name: str, args: dict) -> dict:
    """One measured stage, run inside the child (`_CHILD`)."""
    if name == "build":
        from mtlxray.data.shards import build_shards

        manifest = build_shards(args["src"], args["out"], format="raw", workers=args["workers"], progress=False,
                                image_size=args["size"])
        return {"images": len(manifest["images"]["rows"])}
    if name == "audit":
        from mtlxray.data.audit import audit

        result = audit([args["out"]], args["audit_out"])
        return {"images": sum(result.images.values()), "pairs": result.total_pairs, "groups": result.n_groups}
    if name == "evaluate":
        from mtlxray.config import load_config
        from mtlxray.model import build_model
        from mtlxray.report.evaluate import evaluate_model

        cfg = load_config("demo", [*args["overrides"], "data.workers=0"])
        model = build_model(cfg.model)
        model.set_mode(cfg.phase.name)
        model.eval()
        source = {"checkpoint": None, "model_config": "demo", "overrides": args["overrides"]}
        images = 0
        for subset, split in args["splits"]:
            summary = evaluate_model(model, cfg, args["out"], source, Path(args["eval_out"]) / f"{subset}-{split}",
                                     split=split, subset=subset, n_boot=args["n_boot"], overwrite=True)
            images += int(summary["metrics"]["n_images"])
        return {"images": images}
    if name == "hashes":
        from mtlxray.data.audit import NEAR_THRESHOLD, _scan

        words, planted = planted_hashes(args["n"], args["equal"], args["planted"], NEAR_THRESHOLD)
        content = np.arange(len(words), dtype=np.int64)
        content[len(words) - args["equal"]:] = len(words)  # the equal group: one image, copied
        split = np.arange(len(words), dtype=np.int64) % 3
        t0 = time.perf_counter()
        scan = _scan(words, content, split, 3, NEAR_THRESHOLD)
        seconds = time.perf_counter() - t0
        found = int((scan.group[planted[:, 0]] == scan.group[planted[:, 1]]).sum())
        sizes = np.bincount(scan.group)
        return {"images": len(words), "audit_seconds": seconds, "planted": len(planted), "planted_found": found,
                "near_pairs": int(scan.near.sum()), "exact_pairs": int(scan.exact.sum()),
                "largest_group": int(sizes.max())}
    raise ValueError(f"unknown stage {name!r}")


def _measure(name: str, args: dict) -> dict:
    load = os.getloadavg()[0]
    wall = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", _CHILD, name, json.dumps(args)], capture_output=True, text=True)
    if proc.returncode != 0 or "STAGE_RESULT" not in proc.stdout:
        raise RuntimeError(f"stage {name} failed: {proc.stderr[-2000:]}")
    out = json.loads(proc.stdout.split("STAGE_RESULT", 1)[1])
    return {**out, "wall_s": time.perf_counter() - wall, "load_before": round(load, 2),
            "load_after": round(os.getloadavg()[0], 2)}


def stage_row(what: str, m: dict) -> dict:
    """A table row of a measured stage."""
    seconds = m.get("audit_seconds", m["seconds"])  # hashes: the audit, not drawing the hashes
    cpu = m["cpu_s"] + m["workers_cpu_s"]
    return {"stage": what, "images": m["images"], "s": seconds, "img/s": m["images"] / seconds,
            "img/cpu_s": m["images"] / cpu if cpu and "audit_seconds" not in m else None, "peak_MiB": m["peak_mib"],
            "after_imports_MiB": m["base_mib"], "workers_peak_MiB": m["workers_peak_mib"],
            "load": f"{m['load_before']}-{m['load_after']}"}


def run(ctx):
    # Imported here, not at the top: the stage children import this module and need not load torch
    # (which bench.common imports) unless their stage does.
    from mtlxray.bench.common import SuiteResult, Target
    from mtlxray.data.synth import SCALE_COUNTS, synthesize

    scale = ctx.pick("paper", "paper", "tiny")
    linked = ctx.quick and not ctx.smoke
    size = ctx.pick(256, 256, 64)
    n_hashes, equal, planted = ctx.pick((HASHES, EQUAL_GROUP, PLANTED), (HASHES, EQUAL_GROUP, PLANTED),
                                        (20_000, 2_000, 200))
    result = SuiteResult("scale")
    stages: dict[str, dict] = {}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        tmp_path = Path(tmp)
        t0 = time.perf_counter()
        if linked:
            synthesize(tmp_path / "small", scale="small", size=size, workers=0, progress=False)
            n_images = linked_tree(tmp_path / "small", tmp_path / "src", SCALE_COUNTS[scale])
        else:
            synthesize(tmp_path / "src", scale=scale, size=size, workers=0, progress=False)
            n_images = sum(n for splits in SCALE_COUNTS[scale].values() for c in splits.values() for n in c.values())
        synth_s = time.perf_counter() - t0
        common = {"src": str(tmp_path / "src"), "out": str(tmp_path / "out"), "audit_out": str(tmp_path / "audit"),
                  "workers": 2, "size": size}
        stages[f"build {scale} (workers 2)"] = _measure("build", common)
        stages[f"audit {scale}"] = _measure("audit", common)
        splits = ctx.pick(SPLITS, QUICK_SPLITS, QUICK_SPLITS)
        stages[f"evaluate {scale} ({'all splits' if splits == SPLITS else ', '.join('/'.join(s) for s in splits)})"] = \
            _measure("evaluate", {"out": common["out"], "eval_out": str(tmp_path / "eval"), "splits": splits,
                                  "n_boot": ctx.pick(1000, 1000, 20),
                                  "overrides": EVAL_MODEL["quick" if ctx.quick else "full"]
                                  + ([f"model.img_size={size}"] if size != 256 else [])})
    stages[f"audit {n_hashes:,} hashes"] = _measure("hashes", {"n": n_hashes, "equal": equal, "planted": planted})
    for what, m in stages.items():
        result.rows.append(stage_row(what, m))
    build, aud, evaluation, hashes = stages.values()
    result.targets = [
        Target(f"{scale} build peak RSS", build["peak_mib"] / 1024, 2.0, "max", " GiB"),
        Target(f"{scale} build time, 2 workers", build["seconds"], 90.0, "max", " s"),
        Target(f"audit of {n_hashes:,} hashes: time", hashes["audit_seconds"], 300.0, "max", " s"),
        Target(f"audit of {n_hashes:,} hashes: peak RSS", hashes["peak_mib"] / 1024, 4.0, "max", " GiB"),
        Target("recall of the planted near pairs", hashes["planted_found"] / hashes["planted"], 1.0, "min"),
    ]
    result.details = {"scale": scale, "images": n_images, "synth_s": synth_s, "stages": stages,
                      "tree": "hard links to the small scale's 350 images" if linked else "rendered phantoms",
                      "note": "peak_MiB: the stage process's peak resident memory, counted from after its imports "
                              "(their transient peak excluded, what they keep resident included: after_imports_MiB); "
                              "workers_peak_MiB: the largest child process; img/cpu_s: images per CPU second of "
                              "the stage's process and its workers together (what one core does; less sensitive "
                              "than img/s to a shared host's load); load: 1-minute load average before-after (2 cores)"}
    return result

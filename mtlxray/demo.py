"""`mtlxray demo`: the whole pipeline on synthetic data, ending in a Markdown report.

Steps: 1 synthesise phantoms, 2 build raw shards at the model's image size, 3 train phase 1 then
phase 2 through the submitit local executor, 4 evaluate phase 2's best checkpoint on the lung and
infection test splits, 5 predict on a few test images, 6 write <out>/report.md.

Outputs under <out>: data/ (phantoms), shards/, phase1/ and phase2/ (runs), eval-lung/,
eval-infection/, predict/, loss_curves.png, report.md. A second run reuses the phantoms, the
shards (when up to date) and finished training runs (`--resume auto`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from mtlxray import CLASS_NAMES
from mtlxray.checkpoint import load_model_from_checkpoint, read_state
from mtlxray.config import Config, load_config
from mtlxray.data.manifest import SUBSETS, Manifest, read_manifest
from mtlxray.data.shards import build_shards
from mtlxray.data.synth import plan, synthesize
from mtlxray.errors import ConfigError, MtlxError
from mtlxray.hardware import resolve_precision
from mtlxray.io import write_text_atomic
from mtlxray.launch.submit import submit_pipeline
from mtlxray.paper import subset_total
from mtlxray.provenance import provenance
from mtlxray.report.evaluate import FIGURES, evaluate_checkpoint
from mtlxray.report.figures import plot_loss_curves
from mtlxray.report.markdown import (evaluation_markdown, fmt, fmt_ci, fmt_pct, manifest_tables, provenance_line,
                                     rel_path, table)
from mtlxray.report.predict import predict_files, write_predictions
from mtlxray.resources import find_config, shipped_config
from mtlxray.train.logs import run_info_line

logger = logging.getLogger(__name__)

N_STEPS = 6
PREDICT_PER_CLASS = 2


TINY_SCALE_OVERRIDES = (
    "model.img_size=64", "model.embed_dim=12", "model.depths=[1,1,1,1]", "model.num_heads=[1,1,2,2]",
    "model.ppm_bins=[1,2]", "model.ppm_channels=16", "model.decoder_channels=[24,16,12,8]",
    "model.cross_attn_heads=[2,1,1,1]", "model.head_channels=8", "model.cls_channels=8",
    "data.batch_size=6", "schedule.max_steps=2", "schedule.warmup_steps=0",
    "run.tensorboard=false", "run.progress=false",
)
"""`--scale tiny`: a model and schedule that take the whole pipeline through in seconds, to check an
installation (its figures mean nothing); `small` trains the demo configs as shipped."""


def phase2_config_of(phase1: Path) -> Path:
    """The phase-2 config paired with a phase-1 demo config: `<stem>_phase2.yaml` beside it."""
    path = phase1.with_name(f"{phase1.stem}_phase2{phase1.suffix}")
    if not path.is_file():
        raise ConfigError(f"{phase1}: no phase-2 config {path.name} beside it")
    return path


class _Steps:
    """Numbered console output with the time each step took."""

    def __init__(self) -> None:
        self.timings: list[tuple[str, float]] = []

    def run(self, title: str, fn: Callable[[], Any]) -> Any:
        print(f"[{len(self.timings) + 1}/{N_STEPS}] {title} ...", flush=True)
        t0 = time.perf_counter()
        result = fn()
        dt = time.perf_counter() - t0
        self.timings.append((title, dt))
        print(f"      done in {dt:.1f} s", flush=True)
        return result


def _synthesise(root: Path, scale: str, seed: int) -> None:
    marker = root / f".complete-{scale}-{seed}"
    if marker.is_file():
        print(f"      reusing phantoms in {root}")
        return
    synthesize(root, scale, seed=seed, progress=False)
    marker.touch()


def _train(configs: Sequence[Path], overrides: list[str], folder: Path) -> list:
    pipeline = submit_pipeline([str(c) for c in configs], executor="local", overrides=overrides,
                               folder=folder, relay=lambda line: print(f"      {line}", flush=True))
    reports = pipeline.wait()
    for r in reports:
        print(f"      {r}")
    if any(r.state != "COMPLETED" or r.best_checkpoint is None for r in reports):
        raise MtlxError(f"demo training failed; logs under {folder}")
    return reports


def _predict_inputs(tree: Path, scale: str) -> list[Path]:
    """A few test images of each class from the infection subset's folders."""
    picked: dict[str, list[Path]] = {c: [] for c in CLASS_NAMES}
    for spec in plan(scale):
        if spec.subset == "infection" and spec.split == "test" and len(picked[spec.class_name]) < PREDICT_PER_CLASS:
            picked[spec.class_name].append(tree / spec.folder / "images" / spec.name)
    return [p for paths in picked.values() for p in paths]


def _predict(ckpt: str, inputs: list[Path], out: Path) -> list[dict]:
    model, cfg = load_model_from_checkpoint(ckpt)
    records, failures = predict_files(model, cfg.model.img_size, inputs, out)
    if failures:
        raise MtlxError(f"demo prediction failed on {failures[0].path}: {failures[0].error}")
    write_predictions(out, records)
    return records


def _setting(value: object) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def _departures(paper: Config, demo: Config) -> dict[str, tuple[object, object]]:
    """Each setting where `demo` differs from `paper`, dotted name -> (paper value, demo value)."""
    found: dict[str, tuple[object, object]] = {}

    def compare(name: str, a: object, b: object) -> None:
        for f in dataclasses.fields(a):
            if f.name in ("shards", "output_dir", "name", "workers", "init_from"):
                continue
            pa, de = getattr(a, f.name), getattr(b, f.name)
            if dataclasses.is_dataclass(pa):  # data.augment: one row per setting that differs
                compare(f"{name}.{f.name}", pa, de)
            elif pa != de:
                found[f"{name}.{f.name}"] = (pa, de)

    for section in ("model", "data", "optim", "schedule", "phase", "run"):
        compare(section, getattr(paper, section), getattr(demo, section))
    return found


def _scaled_down_rows(phases: Sequence[tuple[Config, Config]], manifest: Manifest) -> list[list[object]]:
    """Settings where the demo's phases differ from the paper's, plus dataset sizes.

    `phases`: (paper config, demo config) per phase. A later phase's row appears only where its
    departure is not the same as phase 1's (the model's size is scaled down once, not twice).
    """
    first = _departures(*phases[0])
    rows: list[list[object]] = [[key, _setting(pa), _setting(de)] for key, (pa, de) in first.items()]
    for number, (paper, demo) in enumerate(phases[1:], start=2):
        rows += [[f"{key} (phase {number})", _setting(pa), _setting(de)]
                 for key, (pa, de) in _departures(paper, demo).items() if first.get(key) != (pa, de)]
    for subset in SUBSETS:
        paper_n = subset_total(subset)
        n = sum(sum(split.values()) for split in manifest.counts.get(subset, {}).values())
        rows.append([f"{subset} subset images", f"{paper_n:,} (COVID-QU-Ex)", f"{n:,} (synthetic phantoms)"])
    return rows


def _phase_rows(reports: list, out: Path) -> list[list[object]]:
    rows = []
    for r in reports:
        state = read_state(Path(r.best_checkpoint))
        cfg = load_config(Path(r.run_dir) / "config.yaml")
        trained = [json.loads(line)["step"] for line in (Path(r.run_dir) / "metrics.jsonl").read_text().splitlines()
                   if line.strip()]
        rows.append([state.phase, r.state, max(trained, default=state.step), state.step, cfg.run.best_metric,
                     state.best_metric, f"`{rel_path(r.best_checkpoint, out)}`"])
    return rows


def training_platform(cfg: Config) -> str:
    """Where the demo's training ran: the GPU when torch sees one (the trainer takes it), else the CPU."""
    if torch.cuda.is_available():
        device_type, where = "cuda", f"on {torch.cuda.get_device_name()} ("
    else:
        device_type, where = "cpu", f"on CPU ({os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}, "
    return (f"{where}training in {resolve_precision(cfg.run.precision, device_type)}, torch {torch.__version__}, "
            f"Python {platform.python_version()})")


def write_demo_report(out: Path, *, phases: Sequence[tuple[Config, Config]], manifest: Manifest, reports: list,
                      evals: dict[str, dict], predictions: list[dict],
                      timings: list[tuple[str, float]]) -> Path:
    """<out>/report.md: data tables, what was scaled down, training curves, evaluations, predictions."""
    lung, inf = evals["lung"]["metrics"], evals["infection"]["metrics"]
    headline = (f"lung Dice **{fmt(lung['lung_dice'])}** (95% CI {fmt_ci(evals['lung']['ci95']['lung_dice'])}) "
                f"and classification accuracy **{fmt(lung['accuracy'])}** (chance {1 / len(CLASS_NAMES):.3f}) on "
                f"the synthetic lung test split, and infection Dice **{fmt(inf['inf_dice'])}** on the COVID-19 "
                f"images of the infection test split (infection marked on {fmt_pct(inf['inf_fp_share'])} of its "
                "Normal and Non-COVID images).")
    pred_rows = [[f"`{Path(p['file']).name}`", p["predicted_class"],
                  *(f"{p['probs'][c]:.3f}" for c in CLASS_NAMES), fmt(p["severity_percent"], 1),
                  f"![overlay](predict/overlays/{p['name']}_overlay.png)"] for p in predictions]
    total = sum(t for _, t in timings)
    parts = [
        "# mtlxray demo report\n",
        f"The whole pipeline on synthetic phantom chest X-rays, {training_platform(phases[0][1])}, in "
        f"{total / 60:.1f} minutes, by {provenance_line(provenance())}. Phase 2's best checkpoint scores {headline}\n",
        "## Steps\n",
        table(["Step", "Seconds"], [[t, f"{s:.1f}"] for t, s in timings]),
        "## What the demo scales down\n",
        "The demo trains a much smaller model on far fewer, simpler images than the paper, so that it "
        "runs in minutes on a laptop CPU; its figures show that the system works, not the paper's "
        "accuracy. Settings that differ from `configs/phase1.yaml`, and in phase 2 from `configs/phase2.yaml`:\n",
        table(["Setting", "Paper", "Demo"], _scaled_down_rows(phases, manifest)),
        "## Data (Table I / II layout)\n",
        manifest_tables(manifest),
        "## Training\n",
        table(["Phase", "State", "Steps trained", "Best step", "Best by", "Best value", "Best checkpoint"],
              _phase_rows(reports, out)),
        *(f"- {Path(r.run_dir).name}: {run_info_line(json.loads((Path(r.run_dir) / 'run.json').read_text()))}\n"
          for r in reports if (Path(r.run_dir) / "run.json").is_file()),
        "\n![Training and validation loss](loss_curves.png)\n",
    ]
    for subset, summary in evals.items():
        figs = {title: f"eval-{subset}/{name}" for title, name in FIGURES.items()}
        parts.append(evaluation_markdown(summary, figs, heading="##", base=out))
    parts += [
        "## Predictions on test images\n",
        f"`mtlxray predict` on {len(predictions)} test images of the infection subset. Severity = "
        "infected lung area / lung area, %. Masks and overlays are under `predict/`.\n",
        table(["File", "Predicted", *(f"P({c})" for c in CLASS_NAMES), "Severity %", "Overlay"], pred_rows),
    ]
    return write_text_atomic(out / "report.md", "\n".join(parts))


def run_demo(out: str | Path = "runs/demo", *, scale: str = "small", config: str | Path | None = None,
             overrides: Sequence[str] = (), seed: int = 0, n_boot: int = 1000) -> Path:
    """Run the six steps under `out` and return the report's path.

    `config` is a path or a shipped config's name (default: the shipped `demo`). `overrides`
    (`a.b=c`) apply to both training phases after the demo's own (shards, output dir, and at the
    tiny scale `TINY_SCALE_OVERRIDES`).
    """
    out = Path(out).resolve()
    phase1 = find_config(config) if config else shipped_config("demo")
    phase2 = phase2_config_of(phase1)
    run_over = [f"data.shards={out / 'shards'}", f"run.output_dir={out}",
                *(TINY_SCALE_OVERRIDES if scale == "tiny" else ()), *overrides]
    demo_cfg = load_config(phase1, run_over)
    phases = [(load_config(shipped_config("phase1")), demo_cfg),
              (load_config(shipped_config("phase2")), load_config(phase2, run_over))]
    tree, shards = out / "data", out / "shards"
    steps = _Steps()

    print(f"mtlxray demo: outputs under {out}")
    steps.run(f"synthesise the {scale} phantom set -> data/", lambda: _synthesise(tree, scale, seed))
    steps.run(f"build raw shards at {demo_cfg.model.img_size} px -> shards/",
              lambda: build_shards(tree, shards, format="raw", shard_size=64, image_size=demo_cfg.model.img_size,
                                   progress=False))
    manifest = read_manifest(shards)
    reports = steps.run(f"train {phase1.name} then {phase2.name} (submitit local executor)",
                        lambda: _train([phase1, phase2], run_over, out / "submitit"))
    best = reports[-1].best_checkpoint
    evals = steps.run("evaluate phase 2's best checkpoint on the test splits", lambda: {
        subset: evaluate_checkpoint(best, shards, split="test", subset=subset, out=out / f"eval-{subset}",
                                    batch_size=demo_cfg.data.eval_batch_size, n_boot=n_boot, seed=seed,
                                    overwrite=True)  # the demo's own folders: a rerun replaces them
        for subset in SUBSETS})
    predictions = steps.run("predict on a few test images",
                            lambda: _predict(best, _predict_inputs(tree, scale), out / "predict"))

    def report() -> Path:
        plot_loss_curves({f"Phase {i + 1}: {load_config(Path(r.run_dir) / 'config.yaml').data.subset} subset":
                          Path(r.run_dir) / "metrics.jsonl" for i, r in enumerate(reports)}, out / "loss_curves.png")
        return write_demo_report(out, phases=phases, manifest=manifest, reports=reports,
                                 evals=evals, predictions=predictions, timings=steps.timings)

    path = steps.run("write the report", report)
    lung, inf = evals["lung"]["metrics"], evals["infection"]["metrics"]
    print(f"lung Dice {lung['lung_dice']:.4f}, infection Dice {inf['inf_dice']:.4f}, accuracy {lung['accuracy']:.4f}")
    print(f"report: {path}")
    return path

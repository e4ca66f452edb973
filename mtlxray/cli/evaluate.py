"""`mtlxray evaluate`."""

from __future__ import annotations

import argparse
from pathlib import Path

from mtlxray.cli.common import EPILOG, batch_size_arg, gate_args, gate_options, overwrite_arg
from mtlxray.errors import ConfigError


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "evaluate", help="metrics, confidence intervals and figures on a shard split",
        description="Evaluate a checkpoint, or a model without a training run (--model-config), on a split: "
                    "segmentation and classification metrics with bootstrap intervals, gathered across ranks; "
                    "writes metrics.json, report.md and figures. A model reports the metrics of the outputs it has.",
        epilog=EPILOG)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="checkpoint folder (runs/<name>/checkpoints/best)")
    which.add_argument("--model-config", metavar="YAML",
                       help="build the model from this config and the local weights it names (model.pretrained, "
                            "model.encoder_pretrained), with no training run: zero-shot CLIP "
                            "(configs/baselines/clip_zeroshot.yaml model.pretrained=...)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="with --model-config: dotted overrides applied after the file, e.g. model.pretrained=PATH")
    p.add_argument("--shards", required=True, help="shard root holding manifest.json")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--subset", default=None, help="lung or infection (default: the checkpoint's phase subset)")
    p.add_argument("--out", default=None, help="output folder, which must be empty unless --overwrite (default: "
                                                "runs/<name>/eval-<checkpoint>-<shards>-<subset>-<split> beside the "
                                                "checkpoints, replaced by a rerun; with --model-config "
                                                "<run.output_dir>/<run.name>/eval-pretrained-<shards>-<subset>-<split>)")
    overwrite_arg(p, "evaluate", "metrics.json, per_image.csv, report.md, config.yaml, the figures")
    batch_size_arg(p, 16, " on each process")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (default 1000)")
    p.add_argument("--allow-leakage", action="store_true",
                   help="evaluate even when the split shares images with the checkpoint's training data, or "
                        "when that data cannot be found to check (both refused by default; the report states the "
                        "audit's result either way)")
    gate_args(p, "report metrics with and without a gate that passes an image to the infection and box "
                 "heads when P(positive class) >= P (default: the checkpoint's phase.teacher_forcing gate, "
                 "if any)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mtlxray.dist import is_main_process
    from mtlxray.report.evaluate import evaluate_checkpoint, evaluate_config, headline

    common = dict(split=args.split, subset=args.subset, out=args.out, batch_size=args.batch_size,
                  n_boot=args.bootstrap, gate=gate_options(args), overwrite=args.overwrite)
    if args.model_config is not None:
        summary = evaluate_config(args.model_config, args.overrides, args.shards, **common)
    else:
        if args.overrides:
            raise ConfigError(f"KEY=VALUE overrides ({' '.join(args.overrides)}) go with --model-config; a "
                              "checkpoint is evaluated with the config it was trained with")
        summary = evaluate_checkpoint(args.checkpoint, args.shards, allow_leakage=args.allow_leakage, **common)
    if is_main_process():
        print(headline(summary))
        out = Path(summary["out"])
        print(f"wrote {out / 'metrics.json'}, {out / 'per_image.csv'} and {out / 'report.md'}")
    return 0

"""`mtlxray` command line.

The parsers live here so `mtlxray --help` is fast and complete; each subcommand's work lives in
its own module, imported only when that subcommand runs. A handler is `module:function`, taking
the parsed `argparse.Namespace` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from mtlxray.errors import MtlxError

EPILOG = "Exit codes: 0 ok, 1 bad input or failed run, 2 usage or config error."
TRAIN_EPILOG = ("Exit codes: 0 finished, 1 bad input or failed run, 2 usage or config error, 75 saved `last` "
                "after SIGUSR1/SIGUSR2/SIGTERM and wants a requeue (run again with --resume auto).")
MAIN_EPILOG = ("Exit codes: 0 ok, 1 bad input or failed run, 2 usage or config error; train: 75 saved and "
               "wants a requeue; shards audit: 3 leakage found. Each command's --help gives its own.")


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="YAML",
                   help="config file, or the name of a shipped config (phase1, baselines/unet, ...: `mtlxray config "
                        "list`); an existing file wins over a name; `extends:` is followed")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides applied after the file, e.g. optim.lr=3e-4 data.batch_size=8")


def _probability(text: str) -> float:
    """argparse type: a float in [0, 1] (a usage error, exit 2, otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return value


def _positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def _gate_args(p: argparse.ArgumentParser, gate_help: str) -> None:
    """--gate, --gate-source and --first-stage (MultiCheXNet's gate before the infection and box heads)."""
    p.add_argument("--gate", type=_probability, default=None, metavar="P", help=gate_help)
    p.add_argument("--gate-source", choices=["none", "cls_head", "first_stage"], default=None,
                   help="what gives P(positive class): the model's class head, or a frozen first-stage classifier "
                        "(--first-stage, default model.first_stage); none: no gate (default: the checkpoint's "
                        "phase.teacher_forcing.gate, else cls_head when --gate is given)")
    p.add_argument("--first-stage", default=None, metavar="CKPT",
                   help="classification checkpoint for --gate-source first_stage (default: model.first_stage)")


class _VersionAction(argparse.Action):
    """--version: the package's version, with the git commit when run from a checkout (asked only when used)."""

    def __init__(self, option_strings: list[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        from mtlxray.resources import version_string

        print(f"mtlxray {version_string()}")
        parser.exit()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtlxray",
        description="Multi-task Swin-UNet for chest X-rays: synthetic data, WebDataset shards, "
                    "two-phase training on Accelerate/DeepSpeed, Slurm/submitit launchers, reports.",
        epilog=MAIN_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true",
                        help="debug logging, and the libraries' info lines (onnx export passes, COCO evaluation "
                             "tables, open_clip's model loading), which are hidden by default")
    parser.add_argument("--version", action=_VersionAction,
                        help="show the version (and the git commit when run from a checkout) and exit")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # config ------------------------------------------------------------------------------
    p = sub.add_parser("config", help="list and inspect configs",
                       description="List the shipped configs, or inspect a configuration file.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
    q = csub.add_parser("list", help="list the configs that ship with mtlxray, by name",
                        description="List the shipped configs (the repository's configs/, which a wheel carries) "
                                    "by the names `--config` takes, each with the first line of its comment, and "
                                    "the folder they are in. A path to a file always wins over a name.")
    q.set_defaults(handler="mtlxray.cli:config_list")
    q = csub.add_parser("show", help="print the fully resolved config as YAML",
                        description="Resolve `extends:`, apply overrides, validate every key and type, "
                                    "and print the result as YAML.")
    _config_args(q)
    q.set_defaults(handler="mtlxray.cli:config_show")

    # synth -------------------------------------------------------------------------------
    p = sub.add_parser(
        "synth", help="write synthetic phantom chest X-rays in the COVID-QU-Ex layout",
        description="Write synthetic phantom chest X-rays with exact lung and infection masks, in the "
                    "on-disk layout of the COVID-QU-Ex release (so the real reader is exercised). "
                    "Deterministic for a seed.")
    p.add_argument("--output", "-o", required=True, help="output folder (created)")
    p.add_argument("--scale", choices=["tiny", "small", "paper"], default="small",
                   help="tiny: a few dozen images (tests); small: a few hundred (demo); "
                        "paper: the exact Table I/II counts (39,746 images). Default: small")
    p.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    p.add_argument("--size", type=int, default=256, help="image side in pixels (default 256)")
    p.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    p.add_argument("--duplicates", type=int, default=0, metavar="N",
                   help="plant N duplicates across splits (alternately exact copies and near copies: "
                        "resized, JPEG re-encoded, brightness-changed or shifted by a pixel), replacing "
                        "val/test images so the counts stay; the truth goes to duplicates.json (default 0)")
    p.set_defaults(handler="mtlxray.data.synth:cli_main")

    # shards ------------------------------------------------------------------------------
    p = sub.add_parser("shards", help="build and inspect WebDataset shards",
                       description="Build WebDataset tar shards from a dataset folder, or show a manifest.")
    ssub = p.add_subparsers(dest="shards_command", metavar="ACTION", required=True)
    q = ssub.add_parser(
        "build", help="pack a dataset folder into tar shards + manifest.json",
        description="Write OUTPUT/<subset>/<split>-NNNNNN.tar (subset: lung, infection) and "
                    "OUTPUT/manifest.json. Shards are written under a temporary name and renamed; "
                    "the manifest goes last. Bad inputs fail the build unless --skip-bad.")
    q.add_argument("--layout", choices=["covid-qu-ex", "radiography"], default="covid-qu-ex",
                   help="input layout (default covid-qu-ex)")
    q.add_argument("--input", "-i", required=True, help="dataset root folder")
    q.add_argument("--output", "-o", default=None,
                   help="shard root (default shards/synthetic; without --output an existing set of another "
                        "format, size, layout, label scheme or input is refused, never overwritten)")
    q.add_argument("--format", choices=["png", "raw"], default="png",
                   help="image/mask encoding inside the tar: png (small) or raw uint8 (fast). Default png")
    q.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    q.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    q.add_argument("--skip-bad", action="store_true",
                   help="skip bad inputs, record them in skipped.jsonl and the manifest, instead of failing")
    q.add_argument("--seed", type=int, default=0, help="seed of the radiography train/val split (default 0)")
    q.add_argument("--val-fraction", type=float, default=0.2, help="radiography val fraction (default 0.2)")
    q.add_argument("--image-size", type=int, default=256, metavar="PX",
                   help="side of the stored square images and masks (default 256; configs/demo.yaml needs 128)")
    q.add_argument("--classes", choices=["covid3", "radiography4"], default="covid3",
                   help="label scheme stored in cls.json and the manifest: covid3 (Normal, Non-COVID, COVID-19) "
                        "or radiography4 (the Radiography DB's 4 classes). Default covid3")
    q.add_argument("--dedupe", choices=["none", "drop", "keep-first"], default="none",
                   help="exact and near duplicate images: none (keep all; still counted in the manifest), "
                        "drop (every copy) or keep-first (one copy: test before val before train). Default none")
    q.add_argument("--exclude-from", action="append", default=[], metavar="OTHER_SHARDS",
                   help="leave out every image that (exactly or nearly) appears in the test split of this "
                        "other shard set (folder or URL; repeatable). Recorded in the manifest")
    q.add_argument("--near-threshold", type=int, default=16, metavar="BITS",
                   help="largest perceptual-hash distance (of 255 bits) of a near duplicate (default 16)")
    q.set_defaults(handler="mtlxray.data.shards:cli_build")
    q = ssub.add_parser("info", help="print Table I/II-style counts from a manifest",
                        description="Print per-subset, per-split, per-class counts from manifest.json, the "
                                    "duplicate summary, and for the Radiography DB a check against the "
                                    "release's 21,165 images per class.")
    q.add_argument("root", help="shard root holding manifest.json (folder or http(s)/s3 URL)")
    q.add_argument("--json", action="store_true", help="print the counts as JSON")
    q.set_defaults(handler="mtlxray.data.shards:cli_info")
    q = ssub.add_parser(
        "audit", help="find exact and near duplicate images across subsets, splits and shard sets",
        description="Compare the image hashes of one or more shard sets' manifests. Prints a table, writes "
                    "OUT/audit.csv (the first 200 pairs, leakage first; every pair with --all-pairs) and "
                    "OUT/contact_sheet.png (the first pairs side by side); many copies of one image are "
                    "reported once, as a group. "
                    "A pair whose images sit in different splits (train/val/test) is leakage. "
                    "Exit 0 when clean, 3 when leakage is found.")
    q.add_argument("shards", nargs="+", metavar="SHARDS", help="shard roots (folders or http(s)/s3 URLs)")
    q.add_argument("--out", default="audit", help="folder for audit.csv and contact_sheet.png (default ./audit)")
    q.add_argument("--threshold", type=int, default=16, metavar="BITS",
                   help="largest perceptual-hash distance (of 255 bits) of a near duplicate (default 16)")
    q.add_argument("--sheet-pairs", type=int, default=24, metavar="N",
                   help="pairs shown in the contact sheet, leakage first (default 24; 0: no sheet)")
    q.add_argument("--all-pairs", action="store_true",
                   help="write every pair to audit.csv, streamed (N copies of one image are N^2/2 rows)")
    q.set_defaults(handler="mtlxray.data.audit:cli_audit")

    # model-summary -----------------------------------------------------------------------
    p = sub.add_parser(
        "model-summary", help="parameter counts per part and GFLOPs per image",
        description="Print the parameter count of each part beside the paper's figure, and the GFLOPs "
                    "per image (forward and forward+backward) counted with torch.utils.flop_counter.")
    _config_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument("--lr-groups", action="store_true",
                   help="list the optimizer's parameter groups of the config's phase instead: their modules, "
                        "parameter count, learning rate and weight decay")
    p.set_defaults(handler="mtlxray.cli:model_summary")

    # train -------------------------------------------------------------------------------
    p = sub.add_parser(
        "train", help="train one phase (works under accelerate launch, torchrun and srun)",
        description="Train one phase as configured. Run it plainly for one process, or under "
                    "`accelerate launch`, `torchrun` or `srun` for many. On SIGUSR1/SIGTERM it saves "
                    "`last` and exits 75 so a launcher can requeue it.",
        epilog=TRAIN_EPILOG)
    _config_args(p)
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto (default): continue from the run's newest complete checkpoint if any; "
                        "none: start fresh (refused in a run folder that already holds a run, unless "
                        "--overwrite); PATH: a checkpoint folder")
    p.add_argument("--overwrite", action="store_true",
                   help="with --resume none: delete the earlier run's checkpoints, metrics and TensorBoard "
                        "logs in runs/<run.name> first")
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though the config differs from the checkpoint's in settings that change "
                        "the training (refused otherwise, naming them); schedule.epochs/max_steps, logging, "
                        "run.eval_every/save_every and launch resources may always change")
    p.set_defaults(handler="mtlxray.train.main:cli_main")

    # evaluate ----------------------------------------------------------------------------
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
    p.add_argument("--overwrite", action="store_true",
                   help="evaluate into a non-empty --out: first delete what an earlier evaluate wrote there "
                        "(metrics.json, per_image.csv, report.md, config.yaml, the figures); other files are kept")
    p.add_argument("--batch-size", type=_positive_int, default=16, metavar="N",
                   help="images per forward pass on each process (default 16); lower it if memory is short")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (default 1000)")
    p.add_argument("--allow-leakage", action="store_true",
                   help="evaluate even when the split shares images with the checkpoint's training data, or "
                        "when that data cannot be found to check (both refused by default; the report states the "
                        "audit's result either way)")
    _gate_args(p, "report metrics with and without a gate that passes an image to the infection and box "
                  "heads when P(positive class) >= P (default: the checkpoint's phase.teacher_forcing gate, "
                  "if any)")
    p.set_defaults(handler="mtlxray.report.evaluate:cli_main")

    # compare -----------------------------------------------------------------------------
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
    p.set_defaults(handler="mtlxray.report.compare:cli_main")

    # predict -----------------------------------------------------------------------------
    p = sub.add_parser(
        "predict", help="masks, overlays, class and severity for image files",
        description="Run a trained model on images or folders. Writes lung/infection masks at the "
                    "original size, an overlay with a legend, predictions.jsonl and predictions.csv "
                    "(class probabilities and severity = infected area / lung area, in %). Bad files "
                    "are reported in errors.jsonl and skipped (exit 1). A non-empty --out is refused "
                    "unless --overwrite.",
        epilog=EPILOG)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="image files or folders of images (PNG, JPEG; not recursive)")
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint folder (runs/<name>/checkpoints/best) or a folder written "
                        "by MTLModel.save_pretrained")
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    p.add_argument("--overwrite", action="store_true",
                   help="predict into a non-empty --out: first delete what an earlier predict wrote there "
                        "(masks/, overlays/, predictions.jsonl/.csv, errors.jsonl); other files are kept")
    _gate_args(p, "report infection and boxes only when P(positive class) >= P (COVID-19 unless "
                  "phase.positive_classes says otherwise), a probability in [0, 1] (MultiCheXNet-style gating; "
                  "default: the checkpoint's phase.teacher_forcing gate, else always report)")
    p.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                   help="images per forward pass (default 8); lower it if memory is short")
    p.add_argument("--input-range", choices=("auto", "full", "minmax"), default="auto",
                   help="how a 16-bit image is scaled to 8 bits: auto (default) by its PNG sBIT chunk, else "
                        "by the fewest of 8/10/12/14/16 bits that hold its largest value (a warning says "
                        "so; 12-bit detector data stored in 16 bits would otherwise read near black); "
                        "full: all 16 bits; minmax: the image's own min..max. DICOM: its VOI LUT/window "
                        "and BitsStored (auto, full) or min..max")
    p.set_defaults(handler="mtlxray.report.predict:cli_main")

    # export ------------------------------------------------------------------------------
    p = sub.add_parser(
        "export", help="export a checkpoint to safetensors, TorchScript or ONNX",
        description="Export a trained model (a training checkpoint or save_pretrained folder), then "
                    "report the largest difference between the export and PyTorch on a test batch. "
                    "Graphs take B×1×S×S images in [0, 1] with any batch size B. ONNX needs the "
                    "`onnx` and `onnxscript` packages, its check `onnxruntime` "
                    "(pip install 'mtlxray[export]').",
        epilog=EPILOG)
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint folder (runs/<name>/checkpoints/best) or a folder written "
                        "by MTLModel.save_pretrained")
    p.add_argument("--format", choices=["safetensors", "torchscript", "onnx"], required=True,
                   help="safetensors: fp32 weights with the config in the metadata; torchscript: a traced "
                        "module for libtorch; onnx: an opset-18 graph for onnxruntime and other runtimes")
    p.add_argument("--out", required=True, help="output file (written atomically)")
    p.set_defaults(handler="mtlxray.report.export:cli_main")

    # submit ------------------------------------------------------------------------------
    p = sub.add_parser(
        "submit", help="submit a chain of phases (phase1 -> phase2 -> ...) with submitit (Slurm or local)",
        description="Submit one job per config with submitit; each later config runs with "
                    "--dependency=afterok on the previous one and starts from its best checkpoint. "
                    "Before anything is submitted, every phase's config, shards and phase.init_from are "
                    "checked and, on Slurm, every job is put to `sbatch --test-only`. "
                    "Jobs save and requeue on timeout or preemption. Resource options apply to every job "
                    "and override the configs' launch: sections.")
    _config_args(p)
    p.add_argument("--then", action="append", default=[], metavar="YAML",
                   help="a config to run after the previous one succeeds, from its best checkpoint "
                        "(repeatable: --then b.yaml --then c.yaml ...)")
    p.add_argument("--executor", choices=["slurm", "local"], default=None,
                   help="default: launch.executor from the config")
    p.add_argument("--nodes", type=int, default=None, help="nodes per job (default: launch.nodes)")
    p.add_argument("--gpus-per-node", type=int, default=None,
                   help="GPUs per node, one training process each; 0 for CPU nodes (default: launch.gpus_per_node)")
    p.add_argument("--cpus-per-task", type=int, default=None,
                   help="CPUs per training process, its data workers included (default: launch.cpus_per_task)")
    p.add_argument("--mem", default=None, metavar="SIZE",
                   help="memory per node, e.g. 64G or 500M; a bare number is MB as for sbatch "
                        "(default: launch.mem_gb, or the cluster's default)")
    p.add_argument("--time", default=None, metavar="TIME",
                   help="time limit per job in Slurm's format: minutes, H:M:S, D-H or D-H:M:S "
                        "(default: launch.timeout_min)")
    p.add_argument("--timeout-min", type=int, default=None, help="time limit per job in minutes (or use --time)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: launch.partition)")
    p.add_argument("--account", default=None, help="Slurm account to charge (default: launch.account)")
    p.add_argument("--qos", default=None, help="Slurm quality of service (default: launch.qos)")
    p.add_argument("--folder", default=None, help="submitit log folder (default runs/<name>/submitit)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the chain and print every job's sbatch options; submit nothing")
    p.add_argument("--wait", action="store_true",
                   help="wait for the chain (every task of multi-node jobs) and report each phase's state; "
                        "exit 1 unless all completed")
    p.set_defaults(handler="mtlxray.launch.submit:cli_main")

    # sweep -------------------------------------------------------------------------------
    p = sub.add_parser(
        "sweep", help="a chain of phases over seeds x a grid of settings (Slurm job arrays or local workers)",
        description="Run the chain --config [--then ...] once per point of the grid and seed, each in "
                    "OUT/<point>/seed<k>/, then evaluate each one's best checkpoint on the test split (per-image "
                    "records kept). Slurm: one job array per phase, phase k+1 depending element by element on "
                    "phase k (aftercorr). Local: --jobs worker slots, each pinned to its share of the cores. The "
                    "whole sweep is checked before anything runs; OUT/sweep.json records points, job ids and "
                    "states. Running the same command again skips finished elements and reruns failed or missing "
                    "ones. Aggregate with `mtlxray compare --sweep OUT` (docs/sweeps.md). KEY=VALUE overrides apply to every "
                    "element; write them last (after --out DIR), not right after --seeds.",
        epilog=EPILOG)
    _config_args(p)
    p.add_argument("--then", action="append", default=[], metavar="YAML",
                   help="a later phase, started from the previous one's best checkpoint (repeatable)")
    p.add_argument("--seeds", type=int, nargs="+", required=True, metavar="SEED", help="training seeds (run.seed)")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2",
                   help="one axis of settings, e.g. run.precision=fp32,bf16 (repeatable: the points are the "
                        "product of the axes; commas inside [...] belong to a value)")
    p.add_argument("--out", required=True, metavar="DIR", help="the sweep's folder; its name names the sweep")
    p.add_argument("--executor", choices=["slurm", "local"], default=None,
                   help="default: launch.executor from the config")
    p.add_argument("--jobs", type=_positive_int, default=1, metavar="N",
                   help="local: elements run at once, each pinned to 1/N of the cores (default 1)")
    p.add_argument("--array-parallelism", type=_positive_int, default=None, metavar="N",
                   help="Slurm: elements of one array running at once (--array=...%%N; default 256)")
    p.add_argument("--eval-subset", action="append", default=[], choices=["lung", "infection"],
                   help="subset(s) to evaluate each element on (repeatable; default: the last phase's subset)")
    p.add_argument("--eval-split", default="test", help="split to evaluate (default test)")
    p.add_argument("--eval-bootstrap", type=int, default=1000, metavar="N",
                   help="bootstrap resamples of each evaluation's own intervals (default 1000; `compare --sweep` "
                        "draws its own)")
    p.add_argument("--nodes", type=int, default=None, help="Slurm: nodes per job (default: launch.nodes)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="Slurm: GPUs per node (default: launch.gpus_per_node)")
    p.add_argument("--cpus-per-task", type=int, default=None, help="Slurm: CPUs per task (default: launch.cpus_per_task)")
    p.add_argument("--time", default=None, metavar="TIME", help="Slurm: time limit per job (default: launch.timeout_min)")
    p.add_argument("--partition", default=None, help="Slurm partition (default: launch.partition)")
    p.add_argument("--wait", action="store_true",
                   help="Slurm: wait for every element and record its final state (local always waits)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the whole sweep, print the points, the elements' states and the jobs; run nothing")
    p.set_defaults(handler="mtlxray.launch.sweep:cli_main")

    # demo --------------------------------------------------------------------------------
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
    p.add_argument("--bootstrap", type=_positive_int, default=1000, metavar="N",
                   help="bootstrap resamples of the evaluations' 95%% CIs (default 1000)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides for both phases, after the demo's own, e.g. schedule.epochs=4")
    p.set_defaults(handler="mtlxray.demo:cli_main")

    # bench -------------------------------------------------------------------------------
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
    p.set_defaults(handler="mtlxray.bench.run:cli_main")

    # slurm-scripts -----------------------------------------------------------------------
    p = sub.add_parser(
        "slurm-scripts", help="write the sbatch scripts (phase1.sh, phase2.sh, pipeline.sh, train.sh) into a folder",
        description="Write the package's sbatch scripts into OUT, ready to submit from there with an installed "
                    "package (`cd OUT && sbatch phase1.sh`, `bash pipeline.sh`): they find each other in OUT, "
                    "activate this virtual environment unless MTLX_VENV names another, and read shipped configs "
                    "by name. Also makes OUT/runs for the job logs. Existing scripts of these names are replaced.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the scripts into (created)")
    p.add_argument("--venv", default=None,
                   help="virtual environment the jobs activate by default (default: the one running this command)")
    p.set_defaults(handler="mtlxray.launch.scripts:cli_main")

    # doctor ------------------------------------------------------------------------------
    p = sub.add_parser(
        "doctor", help="check this node (GPUs, kernels, shards, disk, memory) before submitting a config",
        description="Report torch/CUDA/cuDNN/NCCL versions, the GPUs, which SDPA kernels run the model's window "
                    "attention, DeepSpeed's ops (backend deepspeed), the Slurm variables, the shards, free disk "
                    "and a per-GPU memory projection; then one verdict line per problem. Exit 0 when the config "
                    "can run here, 1 when it cannot, 2 for a config error.")
    _config_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print the findings as JSON")
    p.set_defaults(handler="mtlxray.doctor:cli_main")

    return parser


def config_show(args: argparse.Namespace) -> int:
    from mtlxray.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def config_list(args: argparse.Namespace) -> int:
    """`mtlxray config list`: each shipped config's name and the first line of its comment."""
    from mtlxray.resources import configs_dir, shipped_configs

    configs = shipped_configs()
    width = max(map(len, configs))
    print(f"{len(configs)} configs in {configs_dir()} (--config NAME, or a path):")
    for name, path in configs.items():
        first = path.read_text().split("\n", 1)[0]
        summary = first.lstrip("#").strip() if first.startswith("#") else f"({path.suffix[1:]} file)"
        print(f"  {name:<{width}}  {summary}")
    return 0


def model_summary(args: argparse.Namespace) -> int:
    """`mtlxray model-summary`: parameters and FLOPs per part, or (--lr-groups) the optimizer's groups."""
    if not args.lr_groups:
        from mtlxray.model.summary import cli_main

        return cli_main(args)
    import json

    from mtlxray.config import load_config
    from mtlxray.model import build_model
    from mtlxray.train.optim import describe_param_groups, param_groups
    from mtlxray.train.phases import prepare_phase

    cfg = load_config(args.config, args.overrides)
    model = build_model(cfg.model, pretrained=False)
    prepare_phase(model, cfg.phase)
    groups = describe_param_groups(model, param_groups(model, cfg))
    if args.json:
        print(json.dumps({"config": args.config, "phase": cfg.phase.name, "groups": groups}, indent=2))
        return 0
    print(f"{cfg.model.name}, {cfg.phase.name}: optimizer parameter groups (optim.lr={cfg.optim.lr:g})")
    width = max(len(g["name"]) for g in groups)
    for g in groups:
        print(f"  {g['name']:<{width}}  {g['params']:>12,} params  lr {g['lr']:<10.3g} weight decay "
              f"{g['weight_decay']:<8g} {', '.join(g['modules'])}")
    return 0


def _resolve(handler: str):
    """The function named by `module:function` (imported only when its subcommand runs)."""
    module_name, func_name = handler.split(":")
    return getattr(importlib.import_module(module_name), func_name)


def quiet_libraries(record: logging.LogRecord) -> bool:
    """The log filter without -v: mtlxray's INFO lines; a library's from WARNING (onnx_ir and
    onnxscript log ~95 INFO lines per ONNX export, faster_coco_eval its tables); the root logger's
    from ERROR (open_clip logs there: "Model initialized randomly" is a warning, though mtlxray then
    loads model.pretrained or the checkpoint)."""
    if record.name == "mtlxray" or record.name.startswith("mtlxray."):
        return True
    return record.levelno >= (logging.ERROR if record.name == "root" else logging.WARNING)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command == "train":
        # Before torch is imported (seconds): a preemption signal during start-up is recorded, and
        # the run exits 75 for a requeue instead of dying.
        from mtlxray.train.signals import StopFlag

        StopFlag.install()
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not args.verbose:
        for handler in logging.getLogger().handlers:
            handler.addFilter(quiet_libraries)
    name = " ".join(filter(None, [args.command, getattr(args, "config_command", None),
                                  getattr(args, "shards_command", None)]))
    try:
        return int(_resolve(args.handler)(args) or 0)
    except MtlxError as e:
        print(f"mtlxray {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mtlxray {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

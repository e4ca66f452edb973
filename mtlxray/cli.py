"""`mtlxray` command line.

The parsers live here so `mtlxray --help` is fast and complete; each subcommand's work lives in
its own module, imported only when that subcommand runs. A handler is `module:function`, taking
the parsed `argparse.Namespace` and returning an exit code.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import logging
import sys

from mtlxray.errors import MtlxError

EPILOG = "Exit codes: 0 ok, 1 bad input or failed run, 2 usage/config error or not built, 75 saved and wants requeue."


def _config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--config", "-c", required=required, metavar="YAML",
                   help="config file (configs/phase1.yaml, configs/demo.yaml, ...); `extends:` is followed")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides applied after the file, e.g. optim.lr=3e-4 data.batch_size=8")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mtlxray",
        description="Multi-task Swin-UNet for chest X-rays: synthetic data, WebDataset shards, "
                    "two-phase training on Accelerate/DeepSpeed, Slurm/submitit launchers, reports.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # config ------------------------------------------------------------------------------
    p = sub.add_parser("config", help="inspect configs", description="Inspect configuration files.")
    csub = p.add_subparsers(dest="config_command", metavar="ACTION", required=True)
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
    q.add_argument("--output", "-o", default="shards/synthetic", help="shard root (default shards/synthetic)")
    q.add_argument("--format", choices=["png", "raw"], default="png",
                   help="image/mask encoding inside the tar: png (small) or raw uint8 (fast). Default png")
    q.add_argument("--shard-size", type=int, default=1000, help="samples per shard (default 1000)")
    q.add_argument("--workers", type=int, default=0, help="worker processes (default: all cores)")
    q.add_argument("--skip-bad", action="store_true",
                   help="skip bad inputs, record them in skipped.jsonl and the manifest, instead of failing")
    q.add_argument("--seed", type=int, default=0, help="seed of the radiography train/val split (default 0)")
    q.add_argument("--val-fraction", type=float, default=0.2, help="radiography val fraction (default 0.2)")
    q.set_defaults(handler="mtlxray.data.shards:cli_build")
    q = ssub.add_parser("info", help="print Table I/II-style counts from a manifest",
                        description="Print per-subset, per-split, per-class counts from manifest.json.")
    q.add_argument("root", help="shard root holding manifest.json")
    q.add_argument("--json", action="store_true", help="print the counts as JSON")
    q.set_defaults(handler="mtlxray.data.shards:cli_info")

    # model-summary -----------------------------------------------------------------------
    p = sub.add_parser(
        "model-summary", help="parameter counts per part and GFLOPs per image",
        description="Print the parameter count of each part beside the paper's figure, and the GFLOPs "
                    "per image (forward and forward+backward) counted with torch.utils.flop_counter.")
    _config_args(p, required=False)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler="mtlxray.model.summary:cli_main")

    # train -------------------------------------------------------------------------------
    p = sub.add_parser(
        "train", help="train one phase (works under accelerate launch, torchrun and srun)",
        description="Train one phase as configured. Run it plainly for one process, or under "
                    "`accelerate launch`, `torchrun` or `srun` for many. On SIGUSR1/SIGTERM it saves "
                    "`last` and exits 75 so a launcher can requeue it.",
        epilog=EPILOG)
    _config_args(p)
    p.add_argument("--resume", default="auto", metavar="auto|none|PATH",
                   help="auto (default): continue from the run's newest complete checkpoint if any; "
                        "none: start fresh; PATH: a checkpoint folder")
    p.set_defaults(handler="mtlxray.train.main:cli_main")

    # evaluate ----------------------------------------------------------------------------
    p = sub.add_parser(
        "evaluate", help="metrics, confidence intervals and figures on a shard split",
        description="Evaluate a checkpoint on a split: segmentation and classification metrics with "
                    "bootstrap intervals, gathered across ranks; writes metrics.json, report.md and figures.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (runs/<name>/checkpoints/best)")
    p.add_argument("--shards", required=True, help="shard root holding manifest.json")
    p.add_argument("--split", default="test", help="split to evaluate (default test)")
    p.add_argument("--subset", default=None, help="lung or infection (default: the checkpoint's phase subset)")
    p.add_argument("--out", default=None, help="output folder (default: next to the checkpoint)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for 95%% CIs (default 1000)")
    p.set_defaults(handler="mtlxray.report.evaluate:cli_main")

    # predict -----------------------------------------------------------------------------
    p = sub.add_parser(
        "predict", help="masks, overlays, class and severity for PNG/JPEG files",
        description="Run a checkpoint on images or folders. Writes lung/infection masks at the original "
                    "size, an overlay, and predictions.jsonl (class probabilities and severity = "
                    "infected area / lung area, %%). Bad files are reported and skipped.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image files or folders")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--gate", type=float, default=None, metavar="P",
                   help="report infection only when P(COVID-19) >= P (MultiCheXNet-style gating)")
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(handler="mtlxray.report.predict:cli_main")

    # export ------------------------------------------------------------------------------
    p = sub.add_parser("export", help="export a checkpoint to safetensors, TorchScript or ONNX",
                       description="Export a trained model. ONNX needs the `onnx` package (pip install 'mtlxray[export]').")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder")
    p.add_argument("--format", choices=["safetensors", "torchscript", "onnx"], required=True)
    p.add_argument("--out", required=True, help="output file")
    p.set_defaults(handler="mtlxray.report.export:cli_main")

    # submit ------------------------------------------------------------------------------
    p = sub.add_parser(
        "submit", help="submit a phase1 -> phase2 chain with submitit (Slurm or local)",
        description="Submit one job per config with submitit; each later config runs with "
                    "--dependency=afterok on the previous one and starts from its best checkpoint. "
                    "Jobs save and requeue on timeout or preemption.")
    _config_args(p)
    p.add_argument("--then", action="append", default=[], metavar="YAML",
                   help="a config to run after the previous one succeeds (repeatable)")
    p.add_argument("--executor", choices=["slurm", "local"], default=None,
                   help="default: launch.executor from the config")
    p.add_argument("--nodes", type=int, default=None, help="nodes per job (default: launch.nodes)")
    p.add_argument("--gpus-per-node", type=int, default=None, help="default: launch.gpus_per_node")
    p.add_argument("--timeout-min", type=int, default=None, help="default: launch.timeout_min")
    p.add_argument("--partition", default=None, help="default: launch.partition")
    p.add_argument("--folder", default=None, help="submitit log folder (default runs/<name>/submitit)")
    p.add_argument("--wait", action="store_true", help="wait for the chain and report each phase's state")
    p.set_defaults(handler="mtlxray.launch.submit:cli_main")

    # demo --------------------------------------------------------------------------------
    p = sub.add_parser(
        "demo", help="the whole pipeline on synthetic data, ending in a report",
        description="Synthesise data, build shards, train phase 1 then phase 2 through the submitit local "
                    "executor, evaluate, predict on a few test images, and write report.md with figures.")
    p.add_argument("--out", default="runs/demo", help="output folder (default runs/demo)")
    p.add_argument("--scale", choices=["tiny", "small"], default="small", help="synthetic scale (default small)")
    p.add_argument("--config", default=None, help="phase 1 demo config (default configs/demo.yaml)")
    p.set_defaults(handler="mtlxray.demo:cli_main")

    # bench -------------------------------------------------------------------------------
    p = sub.add_parser(
        "bench", help="run benchmark suites (writes benchmarks/results/<suite>.json)",
        description="Side-by-side performance suites: model, attention, checkpointing, loader, ddp, "
                    "projection, shards, or all.")
    p.add_argument("suite", nargs="?", default="all",
                   help="model|attention|checkpointing|loader|ddp|projection|shards|all (default all)")
    p.add_argument("--quick", action="store_true", help="fewer repeats and smaller sizes")
    p.add_argument("--out", default=None, help="results folder (default benchmarks/results under the working directory; the checkout's benchmarks/README.md results section is rewritten only when writing there)")
    p.set_defaults(handler="mtlxray.bench.run:cli_main")

    return parser


def config_show(args: argparse.Namespace) -> int:
    from mtlxray.config import dump_config, load_config

    cfg = load_config(args.config, args.overrides)
    sys.stdout.write(dump_config(cfg))
    return 0


def _resolve(handler: str):
    """Import `module:function`; None if the module is not part of this build."""
    module_name, func_name = handler.split(":")
    if importlib.util.find_spec(module_name.rsplit(".", 1)[0]) is None:
        return None
    try:
        if importlib.util.find_spec(module_name) is None:
            return None
    except ModuleNotFoundError:
        return None
    return getattr(importlib.import_module(module_name), func_name)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    name = " ".join(filter(None, [args.command, getattr(args, "config_command", None),
                                  getattr(args, "shards_command", None)]))
    func = _resolve(args.handler)
    if func is None:
        print(f"mtlxray {name}: not built yet in this version of mtlxray", file=sys.stderr)
        return 2
    try:
        return int(func(args) or 0)
    except MtlxError as e:
        print(f"mtlxray {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mtlxray {name}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

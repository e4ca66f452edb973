"""`mtlxray` command line.

One module per command group holds its parsers and handlers. A handler turns the parsed
`argparse.Namespace` into keyword arguments for the library and returns an exit code; it imports
the library (torch and the rest) only when its command runs, so `mtlxray --help` stays fast.
"""

from __future__ import annotations

import argparse
import logging
import sys

from mtlxray.cli import (bench, compare, config, demo, doctor, evaluate, export, launch, predict, shards, summary,
                         synth, train)
from mtlxray.errors import MtlxError

MAIN_EPILOG = ("Exit codes: 0 ok, 1 bad input or failed run, 2 usage or config error; train: 75 saved and "
               "wants a requeue; shards audit: 3 leakage found. Each command's --help gives its own.")


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
    config.add_parsers(sub)
    synth.add_parser(sub)
    shards.add_parsers(sub)
    summary.add_parser(sub)
    train.add_parser(sub)
    evaluate.add_parser(sub)
    compare.add_parser(sub)
    predict.add_parser(sub)
    export.add_parser(sub)
    launch.add_submit_parser(sub)
    launch.add_sweep_parser(sub)
    demo.add_parser(sub)
    bench.add_parser(sub)
    launch.add_slurm_scripts_parser(sub)
    doctor.add_parser(sub)
    return parser


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
        return int(args.handler(args) or 0)
    except MtlxError as e:
        print(f"mtlxray {name}: error: {e}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        print(f"mtlxray {name}: interrupted", file=sys.stderr)
        return 130


"""Argument types and option groups that several commands share."""

from __future__ import annotations

import argparse

EPILOG = "Exit codes: 0 ok, 1 bad input or failed run, 2 usage or config error."


def config_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """--config and the trailing KEY=VALUE overrides."""
    p.add_argument("--config", "-c", required=required, metavar="YAML",
                   help="config file, or the name of a shipped config (phase1, baselines/unet, ...: `mtlxray config "
                        "list`); an existing file wins over a name; `extends:` is followed")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides applied after the file, e.g. optim.lr=3e-4 data.batch_size=8")


def probability(text: str) -> float:
    """argparse type: a float in [0, 1] (a usage error, exit 2, otherwise)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is not a probability in [0, 1]")
    return value


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} is not a positive integer")
    return value


def gate_args(p: argparse.ArgumentParser, gate_help: str) -> None:
    """--gate, --gate-source and --first-stage (MultiCheXNet's gate before the infection and box heads)."""
    p.add_argument("--gate", type=probability, default=None, metavar="P", help=gate_help)
    p.add_argument("--gate-source", choices=["none", "cls_head", "first_stage"], default=None,
                   help="what gives P(positive class): the model's class head, or a frozen first-stage classifier "
                        "(--first-stage, default model.first_stage); none: no gate (default: the checkpoint's "
                        "phase.teacher_forcing.gate, else cls_head when --gate is given)")
    p.add_argument("--first-stage", default=None, metavar="CKPT",
                   help="classification checkpoint for --gate-source first_stage (default: model.first_stage)")


def gate_options(args: argparse.Namespace) -> dict:
    """The gate options as keyword arguments: threshold, source, first_stage."""
    return {"threshold": args.gate, "source": args.gate_source, "first_stage": args.first_stage}


def checkpoint_arg(p: argparse.ArgumentParser) -> None:
    """--checkpoint of the commands that run a trained model (predict, export)."""
    p.add_argument("--checkpoint", required=True,
                   help="a training checkpoint folder (runs/<name>/checkpoints/best) or a folder written "
                        "by MTLModel.save_pretrained")


def overwrite_arg(p: argparse.ArgumentParser, command: str, outputs: str) -> None:
    """--overwrite of a command writing into --out: what it deletes first."""
    p.add_argument("--overwrite", action="store_true",
                   help=f"{command} into a non-empty --out: first delete what an earlier {command} wrote there "
                        f"({outputs}); other files are kept")


def batch_size_arg(p: argparse.ArgumentParser, default: int, per: str) -> None:
    """--batch-size of the commands running a model on images."""
    p.add_argument("--batch-size", type=positive_int, default=default, metavar="N",
                   help=f"images per forward pass{per} (default {default}); lower it if memory is short")


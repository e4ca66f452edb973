"""`mtlxray synth`."""

from __future__ import annotations

import argparse


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mtlxray.data.synth import synthesize

    counts = synthesize(args.output, args.scale, args.seed, args.size, args.workers,
                        duplicates=args.duplicates)
    for subset, splits in counts.items():
        total = sum(sum(c.values()) for c in splits.values())
        print(f"{subset}: {total} images  " + "  ".join(
            f"{split}={sum(c.values())}" for split, c in splits.items()))
    return 0

"""`mtlxray shards build|info|audit`."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_parsers(sub: argparse._SubParsersAction) -> None:
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
    q.set_defaults(handler=build)
    q = ssub.add_parser("info", help="print Table I/II-style counts from a manifest",
                        description="Print per-subset, per-split, per-class counts from manifest.json, the "
                                    "duplicate summary, and for the Radiography DB a check against the "
                                    "release's 21,165 images per class.")
    q.add_argument("root", help="shard root holding manifest.json (folder or http(s)/s3 URL)")
    q.add_argument("--json", action="store_true", help="print the counts as JSON")
    q.set_defaults(handler=info)
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
    q.set_defaults(handler=audit)


def build(args: argparse.Namespace) -> int:
    from mtlxray.data.shards import DEFAULT_OUTPUT, build_shards, format_tables, refuse_other_set
    from mtlxray.io import write_stdout

    out = args.output
    if out is None:
        out = DEFAULT_OUTPUT
        refuse_other_set(Path(out), input=args.input, layout=args.layout, format=args.format,
                         image_size=args.image_size, classes=args.classes)
    manifest = build_shards(args.input, out, layout=args.layout, format=args.format,
                            shard_size=args.shard_size, workers=args.workers, skip_bad=args.skip_bad,
                            seed=args.seed, val_fraction=args.val_fraction, image_size=args.image_size,
                            classes=args.classes, dedupe=args.dedupe, exclude_from=args.exclude_from or (),
                            near_threshold=args.near_threshold)
    write_stdout(format_tables(manifest) + "\n")
    return 0


def info(args: argparse.Namespace) -> int:
    import json

    from mtlxray.data.manifest import read_manifest
    from mtlxray.data.shards import format_tables
    from mtlxray.io import write_stdout

    manifest = read_manifest(args.root)
    if args.json:
        write_stdout(json.dumps(manifest.counts, indent=1, sort_keys=True) + "\n")
    else:
        write_stdout(format_tables(manifest.raw) + "\n")
    return 0


def audit(args: argparse.Namespace) -> int:
    from mtlxray.data.audit import EXIT_LEAKAGE, audit, format_audit
    from mtlxray.io import write_stdout

    result = audit(args.shards, args.out, threshold=args.threshold, sheet_pairs=args.sheet_pairs,
                   all_pairs=args.all_pairs)
    write_stdout(format_audit(result))
    if result.leakage_pairs:
        print(f"mtlxray shards audit: {result.leakage_pairs:,} leakage pair(s); see {result.csv}", file=sys.stderr)
        return EXIT_LEAKAGE
    return 0

"""`mtlxray predict`."""

from __future__ import annotations

import argparse
import sys

from mtlxray.cli.common import EPILOG, batch_size_arg, checkpoint_arg, gate_args, gate_options, overwrite_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
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
    checkpoint_arg(p)
    p.add_argument("--out", required=True, help="output folder (created; must be empty unless --overwrite)")
    overwrite_arg(p, "predict", "masks/, overlays/, predictions.jsonl/.csv, errors.jsonl")
    gate_args(p, "report infection and boxes only when P(positive class) >= P (COVID-19 unless "
                 "phase.positive_classes says otherwise), a probability in [0, 1] (MultiCheXNet-style gating; "
                 "default: the checkpoint's phase.teacher_forcing gate, else always report)")
    batch_size_arg(p, 8, "")
    p.add_argument("--input-range", choices=("auto", "full", "minmax"), default="auto",
                   help="how a 16-bit image is scaled to 8 bits: auto (default) by its PNG sBIT chunk, else "
                        "by the fewest of 8/10/12/14/16 bits that hold its largest value (a warning says "
                        "so; 12-bit detector data stored in 16 bits would otherwise read near black); "
                        "full: all 16 bits; minmax: the image's own min..max. DICOM: its VOI LUT/window "
                        "and BitsStored (auto, full) or min..max")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    import itertools

    from mtlxray.errors import DataError, MtlxError
    from mtlxray.eval.gate import resolve_gate
    from mtlxray.report.outdir import claim_output_dir
    from mtlxray.report.predict import (IMAGE_SUFFIXES, PREDICT_OUTPUTS, Failure, check_gate, collect_inputs,
                                        load_predictor, predict_files, write_predictions)

    check_gate(args.gate)
    inputs = collect_inputs(args.inputs)
    failures: list = []  # those met before the first image; predict_files reports the rest
    first = None
    for item in inputs:
        if isinstance(item, Failure):
            failures.append(item)
        else:
            first = item
            break
    if first is None:  # before the output folder exists: no folder holding an empty CSV
        raise DataError("nothing to predict: " + ("; ".join(f"{f.path}: {f.error}" for f in failures)
                                                  or f"no {'/'.join(IMAGE_SUFFIXES)} files in {' '.join(args.inputs)}"))
    paths = itertools.chain([first], inputs)
    model, cfg = load_predictor(args.checkpoint)
    gating = resolve_gate(cfg, **gate_options(args))
    with claim_output_dir(args.out, PREDICT_OUTPUTS, overwrite=args.overwrite, command="predict") as out:
        try:
            records, bad = predict_files(model, cfg.model.img_size, paths, out, gate=args.gate,
                                         batch_size=args.batch_size, gating=gating, input_range=args.input_range,
                                         progress=True)
            failures += bad
            write_predictions(out, records, failures)
        except OSError as e:  # a full disk or a folder removed under us: one line, not a traceback
            raise MtlxError(f"--out {out}: writing failed: {e.strerror or e}"
                            f"{f' ({e.filename})' if getattr(e, 'filename', None) else ''}") from None
    for r in records:
        sev = "n/a" if r["severity_percent"] is None else f"{r['severity_percent']:.1f}%"
        boxes = "" if r["boxes"] is None else f", {len(r['boxes'])} infection box(es)"
        print(f"{r['file']}: {r['predicted_class']} (p={r['probs'][r['predicted_class']]:.3f}), severity {sev}{boxes}")
    for f in failures:
        print(f"FAILED {f.path}: {f.error}", file=sys.stderr)
    print(f"{len(records)} image(s) predicted, {len(failures)} failed -> {out / 'predictions.jsonl'}, "
          f"{out / 'predictions.csv'}")
    return 1 if failures else 0

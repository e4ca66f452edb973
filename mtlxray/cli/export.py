"""`mtlxray export`."""

from __future__ import annotations

import argparse
import importlib.util
import time

from mtlxray.cli.common import EPILOG, checkpoint_arg


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "export", help="export a checkpoint to safetensors, TorchScript or ONNX",
        description="Export a trained model (a training checkpoint or save_pretrained folder), then "
                    "report the largest difference between the export and PyTorch on a test batch. "
                    "Graphs take B×1×S×S images in [0, 1] with any batch size B. ONNX needs the "
                    "`onnx` and `onnxscript` packages, its check `onnxruntime` "
                    "(pip install 'mtlxray[export]').",
        epilog=EPILOG)
    checkpoint_arg(p)
    p.add_argument("--format", choices=["safetensors", "torchscript", "onnx"], required=True,
                   help="safetensors: fp32 weights with the config in the metadata; torchscript: a traced "
                        "module for libtorch; onnx: an opset-18 graph for onnxruntime and other runtimes")
    p.add_argument("--out", required=True, help="output file (written atomically)")
    p.set_defaults(handler=run)


def run(args: argparse.Namespace) -> int:
    from mtlxray.report.export import example_input, export_checkpoint, max_abs_diff

    start = time.perf_counter()
    out, model, cfg = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"exported {args.checkpoint} as {args.format} -> {out} ({out.stat().st_size / 1e6:.1f} MB, "
          f"{time.perf_counter() - start:.1f} s)")
    if args.format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        print("numerical check skipped: install onnxruntime to compare the ONNX graph with PyTorch")
        return 0
    x = example_input(cfg, batch=2, seed=1)
    diff = max_abs_diff(model, out, args.format, x)
    print(f"max |export - PyTorch| on a test batch of {x.shape[0]}: {diff:.2e}")
    return 0

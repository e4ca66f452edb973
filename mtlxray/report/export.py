"""`mtlxray export`: a checkpoint as safetensors (weights + config), TorchScript or ONNX.

Exported graphs take a B×1×S×S float image in [0, 1] (S = model.img_size; ONNX: B = 1) and
return the tuple (lung logits B×1×S×S, infection logits B×1×S×S, class logits B×C); a phase-1
model has no infection output and returns (lung, class). After writing, the command runs the
export on a test input and reports its largest difference from the PyTorch model (for ONNX only
when onnxruntime is installed: onnx's reference evaluator is too slow for a full model).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import logging
import os
import tempfile
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from mtlxray.config import Config, config_from_dict, dump_config
from mtlxray.errors import CheckpointError, MtlxError

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "torchscript", "onnx")
OUTPUT_NAMES = ("lung", "inf", "cls")
ONNX_OPSET = 17


def output_names(model: nn.Module) -> tuple[str, ...]:
    """Outputs of the model in its mode: a phase-1 model has no infection output."""
    return OUTPUT_NAMES if model.mode == "phase2" else ("lung", "cls")


class ExportWrapper(nn.Module):
    """The model with a tuple output (`output_names` order), which tracers and ONNX need."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.names = output_names(model)

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        out = self.model(x)
        return tuple(out[k] for k in self.names)


@contextlib.contextmanager
def _atomic_path(out: Path) -> Iterator[Path]:
    """A temp path beside `out`, renamed onto `out` when the block succeeds."""
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.")
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _require_onnx():
    """The onnx module; MtlxError naming the package when it is absent."""
    try:
        import onnx
    except ImportError:
        raise MtlxError("ONNX export needs the `onnx` package: pip install 'mtlxray[export]'") from None
    return onnx


def example_input(cfg: Config, batch: int = 1, seed: int = 0) -> Tensor:
    """A deterministic B×1×S×S input in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, generator=gen)


def export_safetensors(model: nn.Module, cfg: Config, out: Path) -> Path:
    """Weights plus the resolved config (metadata "config", YAML) in one safetensors file."""
    from safetensors.torch import save_file

    weights = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    with _atomic_path(out) as tmp:
        save_file(weights, str(tmp), metadata={"config": dump_config(cfg), "format": "mtlxray"})
    return out


def load_safetensors_export(path: str | Path) -> tuple[nn.Module, Config]:
    """(model in eval mode, cfg) from a file written by `export_safetensors`."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    from mtlxray.model import build_model

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise CheckpointError(f"{path}: no `config` metadata (not an mtlxray safetensors export)")
    cfg = config_from_dict(yaml.safe_load(meta["config"]) or {}, f"{path}:config")
    model = build_model(cfg.model)
    model.set_mode(cfg.phase.name)
    model.load_state_dict(load_file(str(path)), strict=True)
    return model.eval(), cfg


def export_torchscript(model: nn.Module, cfg: Config, out: Path) -> Path:
    """A traced TorchScript module (fixed input size, any batch)."""
    with warnings.catch_warnings():
        # torch.jit is deprecated upstream but still the format many C++ deployments load.
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(ExportWrapper(model).eval(), example_input(cfg, batch=2), check_trace=False)
        with _atomic_path(out) as tmp:
            torch.jit.save(traced, str(tmp))
    return out


def export_onnx(model: nn.Module, cfg: Config, out: Path) -> Path:
    """An ONNX graph for batch size 1, checked with onnx.checker.

    Pass a model built with `attention="explicit"` (see `export_checkpoint`). The TorchScript-based
    exporter is used because the encoder's window layout branches on data, which torch.export
    cannot capture. With the fused attention call or a symbolic batch axis, that exporter loses the
    static sizes the pyramid pooling's adaptive_avg_pool2d needs, hence the explicit path and B = 1.
    """
    onnx = _require_onnx()
    names = output_names(model)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        with _atomic_path(out) as tmp:
            torch.onnx.export(ExportWrapper(model).eval(), (example_input(cfg, batch=1),), str(tmp),
                              dynamo=False, input_names=["image"], output_names=list(names),
                              opset_version=ONNX_OPSET)
            onnx.checker.check_model(str(tmp))
    return out


def run_export(path: str | Path, fmt: str, x: Tensor) -> tuple[Tensor, ...]:
    """Run an exported file on x; outputs in `output_names` order. ONNX uses onnxruntime if
    installed, else onnx's reference evaluator (slow, but exact)."""
    if fmt == "safetensors":
        model, _ = load_safetensors_export(path)
        with torch.no_grad():
            return ExportWrapper(model)(x)
    if fmt == "torchscript":
        with torch.no_grad():
            return tuple(torch.jit.load(str(path))(x))
    if fmt == "onnx":
        onnx = _require_onnx()
        feed = {"image": x.numpy()}
        try:
            import onnxruntime

            outs = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feed)
        except ImportError:
            from onnx.reference import ReferenceEvaluator

            outs = ReferenceEvaluator(onnx.load(str(path))).run(None, feed)
        return tuple(torch.from_numpy(o) for o in outs)
    raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")


def max_abs_diff(model: nn.Module, path: str | Path, fmt: str, x: Tensor) -> float:
    """Largest absolute difference between the PyTorch model and the export on x, over all outputs."""
    with torch.no_grad():
        ref = ExportWrapper(model.eval())(x)
    got = run_export(path, fmt, x)
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, got))


EXPORTERS = {"safetensors": export_safetensors, "torchscript": export_torchscript, "onnx": export_onnx}


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path) -> tuple[Path, nn.Module, Config]:
    """Export a checkpoint folder to `out` in `fmt`; (out, the PyTorch model as loaded, its config)."""
    from mtlxray.model import build_model
    from mtlxray.checkpoint import load_model_from_checkpoint, load_model_weights

    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    if fmt == "onnx":
        _require_onnx()
    model, cfg = load_model_from_checkpoint(checkpoint)
    model = model.float().eval()
    exported = model
    if fmt == "onnx":
        # The same weights on the explicit-softmax attention path (see export_onnx).
        exported = build_model(dataclasses.replace(cfg.model, attention="explicit"))
        exported.set_mode(cfg.phase.name)
        load_model_weights(exported, checkpoint)
        exported.eval()
    return EXPORTERS[fmt](exported, cfg, Path(out)), model, cfg


def cli_main(args: argparse.Namespace) -> int:
    import importlib.util

    out, model, cfg = export_checkpoint(args.checkpoint, args.format, args.out)
    print(f"exported {args.checkpoint} as {args.format} -> {out} ({out.stat().st_size / 1e6:.1f} MB)")
    if args.format == "onnx" and importlib.util.find_spec("onnxruntime") is None:
        print("numerical check skipped: install onnxruntime to compare the ONNX graph with PyTorch")
        return 0
    diff = max_abs_diff(model, out, args.format, example_input(cfg, batch=1, seed=1))
    print(f"max |export - PyTorch| on a test input: {diff:.2e}")
    return 0

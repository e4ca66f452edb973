"""`mtlxray export`: a trained model as safetensors (weights + config), TorchScript or ONNX.

The checkpoint is a training checkpoint folder or a `save_pretrained` folder, loaded with
`MTLModel.from_pretrained`. Exported graphs take a B×1×S×S float image in [0, 1] (S =
model.img_size, any batch size B) and return the tuple (lung logits B×1×S×S, infection logits
B×1×S×S, class logits B×C); a phase-1 model has no infection output and returns (lung, class).
After writing, the command runs the export on a test batch and reports its largest difference
from the PyTorch model (for ONNX through onnxruntime).

ONNX goes through torch's `torch.export`-based exporter (`dynamo=True`, needs `onnxscript`), with
a symbolic batch axis. The TorchScript-based exporter cannot give the batch axis a name: it loses
the static map sizes that the pyramid pooling's `adaptive_avg_pool2d` needs, and it refuses that
pooling outright when a bin does not divide the map (the paper's bins 3 and 6 on an 8×8
bottleneck).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch
import yaml
from torch import Tensor, nn

from mtlxray.checkpoint import load_model_from_checkpoint
from mtlxray.config import Config, config_from_dict, dump_config
from mtlxray.data.loader import label_names
from mtlxray.errors import CheckpointError, MtlxError
from mtlxray.hardware import resolve_attention
from mtlxray.io import atomic_path, write_error
from mtlxray.model import build_model
from mtlxray.provenance import provenance

logger = logging.getLogger(__name__)

FORMATS = ("safetensors", "torchscript", "onnx")
OUTPUT_NAMES = ("lung", "inf", "cls")
ONNX_OPSET = 18
ONNX_KERNEL = "explicit"
"""Window-attention kernel in ONNX graphs: onnxscript translates SDPA only for 4-D inputs, and the
window attention's are 5-D (B, windows, heads, tokens, dim). Both kernels compute the same maths
(tested against each other)."""
TRACE_BATCH = 2
"""Batch size of the example input the exporters trace with: torch.export specialises a
dimension it sees at size 1, so a batch of 1 would fix the batch axis."""


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


def _require(module: str, purpose: str):
    """Import `module`; MtlxError naming the package and the extra when it is absent."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise MtlxError(f"{purpose} needs the `{module}` package: pip install 'mtlxray[export]'") from None


def _require_onnx():
    """The onnx module, after checking that the exporter's onnxscript is importable too."""
    onnx = _require("onnx", "ONNX export")
    _require("onnxscript", "ONNX export")
    return onnx


def example_input(cfg: Config, batch: int = 1, seed: int = 0) -> Tensor:
    """A deterministic B×1×S×S input in [0, 1]."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(batch, cfg.model.in_chans, cfg.model.img_size, cfg.model.img_size, generator=gen)


@contextlib.contextmanager
def _traceable(model: nn.Module, cfg: Config, kernel: str | None = None) -> Iterator[ExportWrapper]:
    """The model in eval mode, wrapped for tracing, with its window layouts cached for the export
    size (so the trace holds them as constants instead of their data-dependent construction) and,
    if given, `kernel` as its attention kernel for the duration."""
    before = getattr(model, "attention_kernel", None)
    was_training = model.training
    if kernel is not None and before is not None:
        model.set_attention(kernel)
    model.eval()
    try:
        with torch.no_grad():
            model(example_input(cfg, batch=1))
        yield ExportWrapper(model).eval()
    finally:
        if kernel is not None and before is not None:
            model.set_attention(before)
        model.train(was_training)


@contextlib.contextmanager
def _written(out: Path) -> Iterator[Path]:
    """`atomic_path(out)`, with a failed write (a full disk: OSError, safetensors' SafetensorError,
    torch's "file write failed" RuntimeError) as one line naming `out` and the free space there.
    Nothing is left at `out` (the temp file is removed)."""
    from safetensors import SafetensorError

    try:
        with atomic_path(out) as tmp:
            yield tmp
    except (OSError, RuntimeError, SafetensorError) as e:
        raise write_error(out, e) from None


def export_safetensors(model: nn.Module, cfg: Config, out: Path) -> Path:
    """Weights plus the resolved config (metadata "config", YAML) in one safetensors file."""
    from safetensors.torch import save_file

    weights = {k: v.detach().float().contiguous().cpu() for k, v in model.state_dict().items()}
    with _written(out) as tmp:
        save_file(weights, str(tmp), metadata={"config": dump_config(cfg), "format": "mtlxray"})
    return out


def load_safetensors_export(path: str | Path) -> tuple[nn.Module, Config]:
    """(model in eval mode, cfg) from a file written by `export_safetensors`, with the attention
    kernel chosen for CPU fp32, as `load_for_export` does."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "config" not in meta:
        raise CheckpointError(f"{path}: no `config` metadata (not an mtlxray safetensors export)")
    cfg = config_from_dict(yaml.safe_load(meta["config"]) or {}, f"{path}:config")
    model = build_model(cfg.model, pretrained=False)
    model.set_mode(cfg.phase.name)
    model.load_state_dict(load_file(str(path)), strict=True)
    model.set_attention(resolve_attention(cfg.model.attention, torch.float32, "cpu"))
    model.config = cfg
    return model.eval(), cfg


def export_torchscript(model: nn.Module, cfg: Config, out: Path) -> Path:
    """A traced TorchScript module (fixed input size, any batch), with the model's kernel."""
    with warnings.catch_warnings(), _traceable(model, cfg) as wrapped:
        # torch.jit is deprecated upstream but still the format many C++ deployments load.
        warnings.filterwarnings("ignore", message=".*torch.jit.*deprecated", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        traced = torch.jit.trace(wrapped, example_input(cfg, batch=TRACE_BATCH), check_trace=False)
        with _written(out) as tmp:
            torch.jit.save(traced, str(tmp))
    return out


def onnx_metadata(model: nn.Module, cfg: Config) -> dict[str, str]:
    """What a user of the ONNX file needs besides the graph (its `metadata_props`, JSON values): the
    class names in the order of the `cls` output, the input's size, channels and value range (the
    scaling `predict` applies), the outputs, and what produced the file."""
    import json

    size = cfg.model.img_size
    meta = {"class_names": json.dumps(label_names(cfg.data)), "outputs": json.dumps(list(output_names(model))),
            "input": json.dumps({"name": "image", "shape": ["batch", 1, size, size], "dtype": "float32",
                                 "range": [0.0, 1.0], "scaling": "8-bit grayscale / 255, resized bilinearly "
                                 "(antialiased) to the model size"}),
            "outputs_are": "lung and inf: mask logits (sigmoid > 0.5 is the mask); cls: class logits (softmax, "
                           "or sigmoid with model.cls_loss bce_multilabel)",
            "model": cfg.model.name}
    meta.update({k: str(v) for k, v in provenance(cfg).items() if v is not None})
    return meta


def export_onnx(model: nn.Module, cfg: Config, out: Path) -> Path:
    """An ONNX graph (opset `ONNX_OPSET`) with a symbolic batch axis `batch` on the input and every
    output, checked with onnx.checker, and `onnx_metadata` in its metadata_props. The model is traced on the `ONNX_KERNEL` attention path
    (its own kernel is restored afterwards)."""
    onnx = _require_onnx()
    names = output_names(model)
    batch = torch.export.Dim("batch", min=1, max=4096)
    with warnings.catch_warnings(), _traceable(model, cfg, ONNX_KERNEL) as wrapped:
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=FutureWarning)
        program = torch.onnx.export(wrapped, (example_input(cfg, batch=TRACE_BATCH),), dynamo=True,
                                    input_names=["image"], output_names=list(names),
                                    opset_version=ONNX_OPSET, dynamic_shapes=({0: batch},),
                                    verbose=False,
                                    # onnxscript's optimiser folds constants: without it the tiny test
                                    # model's file was 1.6× larger and onnxruntime warned about
                                    # CastLike nodes it could not fold.
                                    optimize=True)
        program.model.metadata_props.update(onnx_metadata(model, cfg))
        with _written(out) as tmp:
            program.save(str(tmp), external_data=False)
            onnx.checker.check_model(str(tmp))
    return out


def run_export(path: str | Path, fmt: str, x: Tensor) -> tuple[Tensor, ...]:
    """Run an exported file on x; outputs in `output_names` order. ONNX runs in onnxruntime."""
    if fmt == "safetensors":
        model, _ = load_safetensors_export(path)
        with torch.no_grad():
            return ExportWrapper(model)(x)
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, message=".*torch.jit.*")
            module = torch.jit.load(str(path))
        with torch.no_grad():
            return tuple(module(x))
    if fmt == "onnx":
        ort = _require("onnxruntime", "Running an ONNX export")
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        outs = session.run(None, {"image": x.numpy()})
        return tuple(torch.from_numpy(o) for o in outs)
    raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")


def max_abs_diff(model: nn.Module, path: str | Path, fmt: str, x: Tensor) -> float:
    """Largest absolute difference between the PyTorch model and the export on x, over all outputs."""
    with torch.no_grad():
        ref = ExportWrapper(model.eval())(x)
    got = run_export(path, fmt, x)
    if len(got) != len(ref):
        raise MtlxError(f"{path}: {len(got)} outputs, the model has {len(ref)}")
    return max((a.float() - b.float()).abs().max().item() for a, b in zip(ref, got))


EXPORTERS = {"safetensors": export_safetensors, "torchscript": export_torchscript, "onnx": export_onnx}


def load_for_export(checkpoint: str | Path) -> tuple[nn.Module, Config]:
    """(fp32 model in eval mode on CPU, its config) from a checkpoint or `save_pretrained` folder,
    with the window-attention kernel chosen for CPU fp32 (`auto` resolved there)."""
    model, cfg = load_model_from_checkpoint(checkpoint)
    model = model.float().eval()
    model.set_attention(resolve_attention(cfg.model.attention, torch.float32, "cpu"))
    return model, cfg


def export_model(model: nn.Module, cfg: Config, fmt: str, out: str | Path) -> Path:
    """Export a loaded model to `out` in `fmt` (see `EXPORTERS`)."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    start = time.perf_counter()
    path = EXPORTERS[fmt](model, cfg, Path(out))
    logger.info("%s export written in %.1f s -> %s", fmt, time.perf_counter() - start, path)
    return path


def export_checkpoint(checkpoint: str | Path, fmt: str, out: str | Path) -> tuple[Path, nn.Module, Config]:
    """Export a checkpoint folder to `out` in `fmt`; (out, the PyTorch model as loaded, its config)."""
    if fmt not in EXPORTERS:
        raise ValueError(f"unknown export format {fmt!r}; choose from {FORMATS}")
    if fmt == "onnx":
        _require_onnx()  # before the (slow) load
    model, cfg = load_for_export(checkpoint)
    return export_model(model, cfg, fmt, out), model, cfg

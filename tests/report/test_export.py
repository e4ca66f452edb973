"""Export round trips: each format reproduces the PyTorch outputs to 1e-4; ONNX runs in onnxruntime
with a symbolic batch axis (batch sizes 1 and 3), for a tiny model with shifted and padded windows
and for the demo (phase 1 and 2) and paper models.

The tiny model must exercise the shift/padding mask: the earlier test model (depths 1-1-1-1, maps
that divide the window) had no mask at all, so the mask's construction was dead code in the trace
and the exporter never met the in-place `blocked &= ...` that broke every real model.
"""

import os
import sys
from pathlib import Path

import pytest
import torch

from mtlxray.cli import main
from mtlxray.config import load_config
from mtlxray.errors import MtlxError
from mtlxray.model.swin import WindowAttention
from mtlxray.report import export as E
from _report_support import TINY_MODEL
from tiny_models import model_with_moved_bn

SUFFIX = {"safetensors": "safetensors", "torchscript": "pt", "onnx": "onnx"}
# 96² gives maps 24/12/6/3 with window 4: stage 3 (6×6) is padded to 8×8 and shifted.
MASKED = TINY_MODEL + ["model.img_size=96", "model.depths=[1,1,2,1]", "model.num_heads=[1,1,2,2]"]


def _model_folder(root, overrides, phase, seed=0, config=None):
    """A save_pretrained folder of a randomly initialised model (BN statistics made non-trivial)."""
    cfg = load_config(config, overrides + [f"phase.name={phase}"])
    model = model_with_moved_bn(cfg.model, phase, seed, mean_std=0.1, var_range=(0.5, 1.5))
    return model.save_pretrained(root, cfg)


@pytest.fixture(scope="module")
def masked_ckpt(tmp_path_factory):
    return _model_folder(tmp_path_factory.mktemp("masked"), MASKED, "phase2")


def test_masked_model_really_has_a_shift_and_padding_mask(masked_ckpt):
    model, cfg = E.load_for_export(masked_ckpt)
    with torch.no_grad():
        model(E.example_input(cfg))
    padded_shifted = [
        m for m in model.modules() if isinstance(m, WindowAttention) and m.shift_size
        and m.input_size[0] % m.window_size and m.attn_mask is not None
    ]
    assert padded_shifted


@pytest.fixture(scope="module")
def masked_onnx(masked_ckpt, tmp_path_factory):
    """One ONNX export of the masked model (exports take a while), made while the model runs SDPA:
    (path, the model, its config)."""
    model, cfg = E.load_for_export(masked_ckpt)
    model.set_attention("sdpa")
    out = E.export_model(model, cfg, "onnx", tmp_path_factory.mktemp("onnx") / "m.onnx")
    return out, model, cfg


def _check_batches(out, fmt, model, cfg, n_outputs=3):
    for batch in (1, 3):  # ONNX: the symbolic batch axis; the trace used batch 2
        x = E.example_input(cfg, batch=batch, seed=5)
        got = E.run_export(out, fmt, x)
        assert [t.shape[0] for t in got] == [batch] * n_outputs
        assert E.max_abs_diff(model, out, fmt, x) < 1e-4


@pytest.mark.parametrize("fmt", ["safetensors", "torchscript"])
def test_export_matches_pytorch_to_1e4_at_batch_1_and_3(masked_ckpt, tmp_path, fmt):
    out, model, cfg = E.export_checkpoint(masked_ckpt, fmt, tmp_path / f"model.{SUFFIX[fmt]}")
    assert out.is_file() and out.stat().st_size > 0
    _check_batches(out, fmt, model, cfg)


def test_onnx_export_runs_in_onnxruntime_at_batch_1_and_3_to_1e4(masked_onnx):
    out, model, cfg = masked_onnx
    _check_batches(out, "onnx", model, cfg)


def test_onnx_graph_has_a_symbolic_batch_axis_and_named_outputs(masked_onnx):
    import onnx

    graph = onnx.load(str(masked_onnx[0])).graph
    for value in [*graph.input, *graph.output]:
        first = value.type.tensor_type.shape.dim[0]
        assert first.dim_param and not first.dim_value, value.name
    assert [v.name for v in graph.input] == ["image"]
    assert [v.name for v in graph.output] == ["lung", "inf", "cls"]


def test_onnx_file_names_its_classes_input_size_and_range(masked_onnx):
    import json

    import onnx

    meta = {p.key: p.value for p in onnx.load(str(masked_onnx[0])).metadata_props}
    cfg = masked_onnx[2]
    assert json.loads(meta["class_names"]) == ["Normal", "Non-COVID", "COVID-19"]  # the cls output's order
    assert json.loads(meta["input"])["shape"] == ["batch", 1, cfg.model.img_size, cfg.model.img_size]
    assert json.loads(meta["input"])["range"] == [0.0, 1.0] and json.loads(meta["outputs"]) == ["lung", "inf", "cls"]
    assert meta["mtlxray_version"] and meta["torch_version"] and len(meta["config_hash"]) == 12


def test_onnx_export_restores_the_models_kernel_and_mode(masked_onnx):
    _, model, _ = masked_onnx
    assert model.attention_kernel == "sdpa" and not model.training


def test_export_of_phase1_model_has_no_infection_output(tiny_ckpt_phase1, tmp_path):
    out, model, cfg = E.export_checkpoint(tiny_ckpt_phase1, "safetensors", tmp_path / "m.safetensors")
    got = E.run_export(out, "safetensors", E.example_input(cfg))
    assert [t.shape[1] for t in got] == [1, cfg.model.num_classes]
    assert E.max_abs_diff(model, out, "safetensors", E.example_input(cfg)) < 1e-4


def test_safetensors_export_carries_config_and_rebuilds_model(tiny_ckpt, tmp_path):
    out, model, cfg = E.export_checkpoint(tiny_ckpt, "safetensors", tmp_path / "m.safetensors")
    rebuilt, cfg2 = E.load_safetensors_export(out)
    assert cfg2 == cfg
    for (k, a), (k2, b) in zip(model.state_dict().items(), rebuilt.state_dict().items()):
        assert k == k2 and torch.equal(a, b)


@pytest.mark.parametrize("missing", ["onnx", "onnxscript"])
def test_onnx_export_without_its_packages_names_them(tiny_ckpt, tmp_path, monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # makes `import <missing>` raise ImportError
    with pytest.raises(MtlxError, match=f"`{missing}` package.*mtlxray\\[export\\]"):
        E.export_checkpoint(tiny_ckpt, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_a_full_disk_during_export_is_one_line_and_leaves_no_file(tiny_ckpt, tmp_path, monkeypatch, capsys):
    import safetensors.torch
    from safetensors import SafetensorError

    def full_disk(tensors, filename, metadata=None):  # safetensors' own words for ENOSPC, half-way through
        Path(filename).write_bytes(b"\0" * 64)
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, '
                              'message: "No space left on device" })')

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "m.safetensors"
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "safetensors", "--out", str(out)]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{out}: cannot write: " in err and "StorageFull" in err
    assert err.endswith(" MiB free there)")
    assert list(tmp_path.iterdir()) == []  # neither the file nor its temp


def test_export_cli_reports_difference(tiny_ckpt, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "safetensors",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "max |export - PyTorch| on a test batch of 2: 0.00e+00" in out
    assert (tmp_path / "m.safetensors").is_file()


def test_export_help_describes_every_option(capsys):
    with pytest.raises(SystemExit):
        main(["export", "--help"])
    text = capsys.readouterr().out
    assert "--format {safetensors,torchscript,onnx}" in text
    assert "libtorch" in text and "onnxruntime" in text  # the option's own help, not just its choices


def test_exports_keep_the_umask_mode(masked_ckpt, tmp_path):
    old = os.umask(0o022)
    try:
        for fmt in ("safetensors", "torchscript"):
            out, _, _ = E.export_checkpoint(masked_ckpt, fmt, tmp_path / f"m.{SUFFIX[fmt]}")
            assert out.stat().st_mode & 0o777 == 0o644, fmt
    finally:
        os.umask(old)


# The demo's phase-1 and phase-2 models and the paper's full-size model, each exported once from a
# save_pretrained folder and compared in onnxruntime at batch sizes 1 and 3.
REAL = {
    "demo-phase1": ("configs/demo.yaml", "phase1"),
    "demo-phase2": ("configs/demo_phase2.yaml", "phase2"),
    "paper-phase1": ("configs/phase1.yaml", "phase1"),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(REAL))
def test_onnx_export_of_demo_and_paper_models_runs_in_onnxruntime(name, tmp_path, capsys):
    config, phase = REAL[name]
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    folder = _model_folder(tmp_path / "model", [], phase, seed=1, config=os.path.join(root, config))
    out = tmp_path / "model.onnx"
    # through the command line, as a user would, from a save_pretrained folder
    assert main(["export", "--checkpoint", str(folder), "--format", "onnx", "--out", str(out)]) == 0
    assert "max |export - PyTorch| on a test batch of 2" in capsys.readouterr().out
    model, cfg = E.load_for_export(folder)
    for batch in (1, 3):
        x = E.example_input(cfg, batch=batch, seed=7)
        got = E.run_export(out, "onnx", x)
        assert len(got) == (3 if phase == "phase2" else 2)
        assert got[0].shape == (batch, 1, cfg.model.img_size, cfg.model.img_size)
        assert E.max_abs_diff(model, out, "onnx", x) < 1e-4

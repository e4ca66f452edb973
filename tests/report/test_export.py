"""Export round trips: each installed format reproduces the PyTorch outputs to 1e-4."""

import importlib.util
import sys

import pytest
import torch

from mtlxray.cli import main
from mtlxray.errors import MtlxError
from mtlxray.report import export as E

FORMATS = ["safetensors", "torchscript",
           pytest.param("onnx", marks=pytest.mark.skipif(importlib.util.find_spec("onnx") is None,
                                                        reason="onnx not installed"))]
SUFFIX = {"safetensors": "safetensors", "torchscript": "pt", "onnx": "onnx"}


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_matches_pytorch_to_1e4(tiny_ckpt, tmp_path, fmt):
    out, model, cfg = E.export_checkpoint(tiny_ckpt, fmt, tmp_path / f"model.{SUFFIX[fmt]}")
    assert out.is_file() and out.stat().st_size > 0
    # another batch size than the trace's, except for the fixed-shape ONNX graph
    x = E.example_input(cfg, batch=1 if fmt == "onnx" else 3, seed=5)
    got = E.run_export(out, fmt, x)
    assert len(got) == 3
    assert E.max_abs_diff(model, out, fmt, x) < 1e-4


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


def test_onnx_export_without_onnx_names_the_package(tiny_ckpt, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)  # makes `import onnx` raise ImportError
    with pytest.raises(MtlxError, match="`onnx` package"):
        E.export_checkpoint(tiny_ckpt, "onnx", tmp_path / "m.onnx")
    assert not (tmp_path / "m.onnx").exists()


def test_export_cli_reports_difference(tiny_ckpt, tmp_path, capsys):
    assert main(["export", "--checkpoint", str(tiny_ckpt), "--format", "safetensors",
                 "--out", str(tmp_path / "m.safetensors")]) == 0
    out = capsys.readouterr().out
    assert "max |export - PyTorch| on a test input: 0.00e+00" in out
    assert (tmp_path / "m.safetensors").is_file()

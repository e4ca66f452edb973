import json

import pytest
import torch

from _model_support import tiny_config
from mtlxray.cli import main
from mtlxray.model import build_model, count_params_by_part
from mtlxray.paper import PART_PARAMS

TINY = ["model.img_size=32", "model.window_size=4", "model.embed_dim=12", "model.num_heads=[1,2,2,4]",
        "model.depths=[2,2,2,2]", "model.ppm_channels=8", "model.decoder_channels=[32,16,16,8]",
        "model.cross_attn_heads=[4,2,2,1]", "model.head_channels=8", "model.cls_channels=8"]
PARTS = ["encoder", "ppm", "decoders", "lung_head", "infection_head", "cls_head", "total"]


def test_count_params_by_part_covers_every_parameter_once():
    model = build_model(tiny_config())
    counts = count_params_by_part(model)
    assert list(counts) == PARTS == list(PART_PARAMS)
    assert sum(v for k, v in counts.items() if k != "total") == counts["total"]
    assert counts["decoders"] == sum(p.numel() for p in model.lung_decoder.parameters()) * 2


def test_model_summary_cli_prints_every_part_beside_the_paper(capsys):
    assert main(["model-summary", *TINY]) == 0
    out = capsys.readouterr().out
    for part in PARTS:
        assert part in out
    assert "27,520,000" in out and "44,090,000" in out and "GFLOPs/image: forward" in out


def test_model_summary_cli_json(capsys):
    assert main(["model-summary", "--json", "phase.name=phase2", *TINY]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["mode"] == "phase2"
    assert report["params"] == count_params_by_part(build_model(tiny_config()))
    assert report["paper_params"]["total"] == pytest.approx(44.09e6)
    assert 0 < report["gflops"]["forward"] < report["gflops"]["forward_backward"]


def test_model_summary_cli_bad_override_exits_with_config_error(capsys):
    assert main(["model-summary", "model.name=nope", *TINY]) == 2
    assert "model.name" in capsys.readouterr().err

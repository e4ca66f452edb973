import json
from pathlib import Path

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


def test_model_summary_json_counts_each_mask_head_at_10441(capsys):
    assert main(["model-summary", "--json"]) == 0
    params = json.loads(capsys.readouterr().out)["params"]
    assert params["lung_head"] == params["infection_head"] == 10_441


def test_lr_groups_lists_each_optimizer_group_with_its_rate(capsys):
    config = str(Path(__file__).resolve().parents[2] / "configs" / "phase2.yaml")
    assert main(["model-summary", "--config", config, "--lr-groups", "--json"]) == 0
    groups = {g["name"]: g for g in json.loads(capsys.readouterr().out)["groups"]}
    assert groups["inf_decoder/decay"]["lr"] == pytest.approx(5e-4) and groups["inf_decoder/decay"]["modules"] == ["inf_decoder"]
    assert groups["default/decay"]["lr"] == pytest.approx(1e-5)
    assert groups["cls_head.conv_phase2/decay"]["params"] == 2 * 64 * 9
    assert sum(g["params"] for g in groups.values()) == 44_178_015 - 640  # all but phase 1's class conv
    assert main(["model-summary", "--config", config, "--lr-groups"]) == 0
    assert "inf_decoder/decay" in capsys.readouterr().out

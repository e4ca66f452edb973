"""Every configs/baselines/*.yaml trains one epoch in the real trainer (tiny widths, the tiny 64-px shards),
one of them under 2-rank DDP; the Radiography DB's 4 classes and the multi-label class loss end to end."""

import json
import os
from pathlib import Path

import killable
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from _train_support import REPO, cli_env, error_lines, run_cli
from tiny_baselines import BASELINES, NAMES, baseline_overrides, model_overrides
from tiny_data import write_png
from mtlxray.config import load_config
from mtlxray.errors import ConfigError
from mtlxray.eval.records import metric_names
from mtlxray.train.main import run_training

TRAINED = [n for n in NAMES if n != "clip_zeroshot"]
CLIP_IMAGE_TOWER_ONLY = ("phase.frozen=[clip.transformer,clip.token_embedding,clip.positional_embedding,"
                         "clip.ln_final,clip.text_projection,clip.logit_scale]")
"""Fine-tune CLIP's image tower against the fixed prompt embeddings (the shipped config trains nothing)."""


def _lines(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(name: str, shards: Path, tmp: Path, *extra: str, run_name: str | None = None) -> Path:
    cfg = load_config(BASELINES / f"{name}.yaml", baseline_overrides(name, shards, tmp, tmp, *extra,
                                                                     run_name=run_name))
    assert run_training(cfg, "none") == 0
    return tmp / cfg.run.name


@pytest.mark.parametrize("name", TRAINED)
def test_each_baseline_config_trains_one_epoch_and_validates_its_own_tasks(name, tiny_shards, tmp_path):
    run = _train(name, tiny_shards, tmp_path)
    cfg = load_config(run / "config.yaml")
    lines = _lines(run)
    train = [r for r in lines if r["type"] == "train"]
    assert [r["step"] for r in train] == [1, 2] and all(r["img_per_s"] > 0 for r in train)
    (evaluation,) = [r for r in lines if r["type"] == "eval"]
    tasks = {t for t, w in cfg.phase.loss_weights.items() if w > 0}
    expected = {f"val/{m}" for m in metric_names(sorted(tasks), ["Normal", "Non-COVID", "COVID-19"])}
    assert {k for k in evaluation if k.startswith("val/") and not k.startswith("val/loss")} == expected
    assert cfg.run.best_metric in evaluation and evaluation[cfg.run.best_metric] is not None
    assert ("val/lung_dice" in evaluation) == ("lung" in tasks)  # a classifier reports no Dice,
    assert ("val/accuracy" in evaluation) == ("cls" in tasks)  # a segmenter no class metrics
    assert (run / "checkpoints" / "best" / "model.safetensors").is_file()


@pytest.mark.parametrize("name", ["dinov2_cls", "beitv2_cls"])
def test_partial_fine_tuning_leaves_the_frozen_blocks_as_initialised(name, tiny_shards, tmp_path):
    from accelerate.utils import set_seed

    from mtlxray.model import build_model

    run = _train(name, tiny_shards, tmp_path)
    cfg = load_config(run / "config.yaml")
    set_seed(cfg.run.seed)  # as the trainer does right before building the model
    initial = build_model(cfg.model).state_dict()
    trained = load_file(str(run / "checkpoints" / "last" / "model.safetensors"))
    frozen = [key for key in trained if any(key == p or key.startswith(p + ".") for p in cfg.phase.frozen)]
    assert any(key.startswith("encoder.blocks.7.") for key in frozen), frozen  # the config freezes blocks 0..7
    for key in frozen:
        assert torch.equal(trained[key], initial[key]), key
    assert not torch.equal(trained["encoder.blocks.11.mlp.fc1.weight"], initial["encoder.blocks.11.mlp.fc1.weight"])
    assert not torch.equal(trained["cls_head.weight"], initial["cls_head.weight"])


def test_the_zero_shot_config_has_nothing_to_train_and_its_image_tower_fine_tunes(tiny_shards, tmp_path):
    cfg = load_config(BASELINES / "clip_zeroshot.yaml",
                      baseline_overrides("clip_zeroshot", tiny_shards, tmp_path, tmp_path, run_name="zs"))
    with pytest.raises(ConfigError, match="nothing to train.*evaluate --model-config"):
        run_training(cfg, "none")
    run = _train("clip_zeroshot", tiny_shards, tmp_path, CLIP_IMAGE_TOWER_ONLY, run_name="ft")
    (evaluation,) = [r for r in _lines(run) if r["type"] == "eval"]
    assert "val/f1_macro" in evaluation and "val/lung_dice" not in evaluation


def test_a_baseline_trains_through_mtlxray_train(tiny_shards, tmp_path):
    res = run_cli(["train", "--config", str(BASELINES / "unet.yaml"),
                   *baseline_overrides("unet", tiny_shards, tmp_path, tmp_path), "--resume", "none"])
    assert res.returncode == 0, res.stderr[-3000:]
    assert [r["step"] for r in _lines(tmp_path / "unet") if r["type"] == "train"] == [1, 2]


def test_best_metric_of_another_models_tasks_is_refused_before_training(tiny_shards, tmp_path):
    res = run_cli(["train", "--config", str(BASELINES / "unet.yaml"),
                   *baseline_overrides("unet", tiny_shards, tmp_path, tmp_path, "run.best_metric=val/f1_macro")])
    assert res.returncode == ConfigError.exit_code
    (line,) = error_lines(res.stderr)
    assert "`val/f1_macro` is not an evaluation metric of unet" in line and "val/lung_dice" in line
    assert not (tmp_path / "unet" / "checkpoints").exists()


@pytest.mark.parametrize("name", NAMES)
def test_model_summary_prints_each_baselines_parameters_and_gflops(name, tmp_path, capsys):
    from mtlxray.cli import main
    from mtlxray.model import build_model

    path, over = BASELINES / f"{name}.yaml", model_overrides(name, tmp_path)
    assert main(["model-summary", "--config", str(path), *over]) == 0
    text = capsys.readouterr().out
    assert f"model {name}" in text and "total" in text and "GFLOPs/image: forward" in text
    assert main(["model-summary", "--json", "--config", str(path), *over]) == 0
    report = json.loads(capsys.readouterr().out)
    model = build_model(load_config(path, over).model, pretrained=False)
    assert report["params"]["total"] == sum(p.numel() for p in model.parameters())
    assert 0 < report["gflops"]["forward"] < report["gflops"]["forward_backward"]


# ---------------------------------------------------------------------------------------------------
# the Radiography DB's four classes, and the multi-label class loss


@pytest.fixture(scope="module")
def radiography4_shards(tmp_path_factory) -> Path:
    """A hand-made Radiography DB tree (5 images per class, 64 px) built with its 4 classes."""
    from mtlxray.data.shards import build_shards

    tmp = tmp_path_factory.mktemp("radiography")
    rng = np.random.default_rng(0)
    for c in ("COVID", "Lung_Opacity", "Normal", "Viral Pneumonia"):
        for i in range(1, 6):
            write_png(tmp / "tree" / c / "images" / f"{c}-{i}.png", rng.integers(0, 256, (64, 64), dtype=np.uint8))
            mask = np.zeros((64, 64), np.uint8)
            mask[10:54, 8:30] = 255
            write_png(tmp / "tree" / c / "masks" / f"{c}-{i}.png", mask)
    manifest = build_shards(tmp / "tree", tmp / "shards", layout="radiography", format="raw", image_size=64,
                            workers=1, progress=False, classes="radiography4")
    assert manifest["label_names"] == ["Normal", "Lung_Opacity", "COVID", "Viral Pneumonia"]
    return tmp / "shards"


RADIOGRAPHY4 = ["Normal", "Lung_Opacity", "COVID", "Viral Pneumonia"]


@pytest.mark.parametrize("name", NAMES)
def test_each_radiography_variant_keeps_four_classes_and_the_recipe(name, tmp_path):
    from mtlxray.model import build_model
    from mtlxray.model.registry import model_tasks

    base = load_config(BASELINES / f"{name}.yaml")
    cfg = load_config(BASELINES / "radiography" / f"{name}.yaml", model_overrides(name, tmp_path))
    assert (cfg.data.classes, cfg.model.num_classes, cfg.data.shards) == ("radiography4", 4, "shards/radiography")
    assert (cfg.optim, cfg.schedule, cfg.phase) == (base.optim, base.schedule, base.phase)
    model = build_model(cfg.model).eval()
    if "cls" in model.tasks:
        with torch.no_grad():
            assert model(torch.rand(1, 1, 64, 64))["cls"].shape == (1, 4)
    names = metric_names(sorted(model_tasks(cfg.model)), RADIOGRAPHY4)
    assert cfg.run.best_metric.removeprefix("val/") in names


def test_four_radiography_classes_train_and_validate_under_their_own_names(radiography4_shards, tmp_path):
    cfg = load_config(BASELINES / "radiography" / "mtl_unet.yaml", baseline_overrides(
        "mtl_unet", radiography4_shards, tmp_path, tmp_path))
    assert run_training(cfg, "none") == 0
    (evaluation,) = [r for r in _lines(tmp_path / "mtl_unet") if r["type"] == "eval"]
    assert {k.split("/", 2)[2] for k in evaluation if k.startswith("val/f1/")} == set(RADIOGRAPHY4)
    assert evaluation["val/n_images"] == 4


def test_a_class_count_that_does_not_match_the_data_is_a_config_error_before_training(radiography4_shards, tmp_path):
    res = run_cli(["train", "--config", str(BASELINES / "vit_b_cls.yaml"), *baseline_overrides(
        "vit_b_cls", radiography4_shards, tmp_path, tmp_path, "data.classes=radiography4")])
    assert res.returncode == ConfigError.exit_code
    (line,) = error_lines(res.stderr)
    assert "model.num_classes=3 but data.classes=radiography4 has 4" in line
    assert not (tmp_path / "vit_b_cls").exists()


def test_multilabel_class_loss_trains_and_validates_with_f1_at_half(tiny_shards, tmp_path):
    run = _train("vit_b_cls", tiny_shards, tmp_path, "model.cls_loss=bce_multilabel",
                 "run.best_metric=val/f1_at_0.5_macro")
    (evaluation,) = [r for r in _lines(run) if r["type"] == "eval"]
    names = ["Normal", "Non-COVID", "COVID-19"]
    assert {f"val/{m}" for m in metric_names(["cls"], names, multilabel=True)} <= evaluation.keys()
    assert {"val/f1_at_0.5/COVID-19", "val/f1_at_0.5_macro", "val/auc/Normal"} <= evaluation.keys()


# ---------------------------------------------------------------------------------------------------
# 2-rank DDP


@pytest.mark.distributed
def test_a_baseline_trains_under_two_rank_ddp_with_identical_parameters(tiny_shards, tmp_path):
    bin_dir = Path(os.environ.get("VIRTUAL_ENV", REPO / ".venv")) / "bin"
    launcher = [str(bin_dir / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
                "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0"]
    worker = Path(__file__).with_name("_worker.py")
    args = baseline_overrides("mtl_unet", tiny_shards, tmp_path, tmp_path, "data.samples_per_epoch=8")
    res = killable.run([*launcher, str(worker), str(tmp_path / "out"), "none", "0",
                        str(BASELINES / "mtl_unet.yaml"), *args],
                       cwd=REPO, env={**cli_env(), "ACCELERATE_USE_CPU": "1"}, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    ranks = [json.loads((tmp_path / "out" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["world_size"] for r in ranks] == [2, 2] and [r["step"] for r in ranks] == [2, 2]
    assert ranks[0]["digest"] == ranks[1]["digest"]  # identical parameters on both ranks
    lines = _lines(tmp_path / "mtl_unet")
    assert {r["world_size"] for r in lines if r["type"] == "train"} == {2}
    (evaluation,) = [r for r in lines if r["type"] == "eval"]
    assert evaluation["val/n_images"] == 6  # every validation image once across the two ranks

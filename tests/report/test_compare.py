"""`mtlxray evaluate` for every kind of model (a segmenter, a classifier, zero-shot CLIP from its config)
and `mtlxray compare` over tiny trained baselines."""

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from tiny_baselines import BASELINES, REPO, baseline_overrides, model_overrides
from tiny_data import make_tiny_shards
from mtlxray.config import load_config
from mtlxray.errors import ConfigError
from mtlxray.report.evaluate import evaluate_checkpoint
from mtlxray.train.main import run_training


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mtlxray.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return make_tiny_shards(tmp_path_factory.mktemp("cmp-shards"), format="raw", image_size=64)


@pytest.fixture(scope="module")
def runs(shards, tmp_path_factory) -> Path:
    """runs/unet and runs/vit_b_cls: one tiny epoch each (2 steps)."""
    out = tmp_path_factory.mktemp("runs")
    for name in ("unet", "vit_b_cls"):
        cfg = load_config(BASELINES / f"{name}.yaml", baseline_overrides(name, shards, out, out))
        assert run_training(cfg, "none") == 0
    return out


@pytest.fixture(scope="module")
def clip_eval(shards, runs, tmp_path_factory) -> Path:
    """Zero-shot CLIP evaluated from its config and a tiny open_clip checkpoint: runs/clip_zeroshot/eval-*."""
    tmp = tmp_path_factory.mktemp("clip")
    res = _cli("evaluate", "--model-config", str(BASELINES / "clip_zeroshot.yaml"), *model_overrides("clip_zeroshot", tmp),
               f"run.output_dir={runs}", "data.workers=0", "--shards", str(shards), "--split", "test",
               "--bootstrap", "50")
    assert res.returncode == 0, res.stderr[-3000:]
    assert "no segmentation metrics" in res.stdout and "accuracy" in res.stdout
    (folder,) = (runs / "clip_zeroshot").glob("eval-pretrained-*-lung-test")
    return folder


def test_a_segmenter_reports_no_class_metrics_and_a_classifier_no_dice(runs, shards, tmp_path):
    seg = evaluate_checkpoint(runs / "unet" / "checkpoints" / "best", shards, out=tmp_path / "seg", n_boot=20)
    assert "lung_dice" in seg["metrics"] and "accuracy" not in seg["metrics"] and seg["confusion"] is None
    assert "The model has no class output" in (tmp_path / "seg" / "report.md").read_text()
    cls = evaluate_checkpoint(runs / "vit_b_cls" / "checkpoints" / "best", shards, out=tmp_path / "cls", n_boot=20)
    assert "accuracy" in cls["metrics"] and not any(k.startswith("lung_") for k in cls["metrics"])
    report = (tmp_path / "cls" / "report.md").read_text()
    assert "The model has no segmentation output" in report and "overlays.png" not in report
    assert not (tmp_path / "cls" / "overlays.png").exists() and (tmp_path / "cls" / "confusion.png").is_file()
    rows = list(csv.DictReader((tmp_path / "cls" / "per_image.csv").open()))
    assert len(rows) == 6 and all(r["lung_dice"] == "" and r["p_COVID-19"] != "" for r in rows)
    assert cls["tasks"] == ["cls"] and (tmp_path / "cls" / "config.yaml").is_file()


def test_a_classifier_evaluated_over_a_segmenters_folder_shows_none_of_its_figures(runs, shards, tmp_path):
    out = tmp_path / "e"
    evaluate_checkpoint(runs / "unet" / "checkpoints" / "best", shards, out=out, n_boot=0)
    assert (out / "dice_hist.png").is_file() and (out / "overlays.png").is_file()
    (out / "notes.txt").write_text("mine")
    (out / ".partial-killed").mkdir()  # the temp folder of an evaluation killed while writing
    classifier = runs / "vit_b_cls" / "checkpoints" / "best"
    with pytest.raises(ConfigError, match="not empty: pass --overwrite"):
        evaluate_checkpoint(classifier, shards, out=out, n_boot=0)
    assert (out / "dice_hist.png").is_file() and (out / "metrics.json").is_file()  # refused: nothing touched
    evaluate_checkpoint(classifier, shards, out=out, n_boot=0, overwrite=True)
    report = (out / "report.md").read_text()
    assert "confusion.png" in report and "dice_hist.png" not in report and "overlays.png" not in report
    assert sorted(p.name for p in out.iterdir()) == ["config.yaml", "confusion.png", "metrics.json", "notes.txt",
                                                     "per_image.csv", "report.md"]


def test_zero_shot_clip_needs_no_training_run(clip_eval, shards):
    import torch

    from mtlxray.data.loader import batch_to_device, build_eval_loader
    from mtlxray.model import build_model

    summary = json.loads((clip_eval / "metrics.json").read_text())
    assert summary["checkpoint"] is None and summary["model_config"].endswith("clip_zeroshot.yaml")
    assert summary["tasks"] == ["cls"] and summary["metrics"]["n_images"] == 6
    assert "Model config" in (clip_eval / "report.md").read_text()
    # The probabilities are those of the model built from the saved config with its weights file.
    cfg = load_config(clip_eval / "config.yaml")
    model = build_model(cfg.model).eval()
    probs = {}
    with torch.no_grad():
        for batch in build_eval_loader(cfg.data.__class__(shards=str(shards), workers=0), subset="lung",
                                       split="test", rank=0, world_size=1):
            batch = batch_to_device(batch, "cpu")
            probs.update(zip(batch["key"], torch.softmax(model(batch["img"])["cls"], 1).tolist()))
    for key, p in zip(summary["per_image"]["key"], summary["per_image"]["probs"]):
        assert p == pytest.approx(probs[key], abs=1e-5)


def test_overrides_go_with_model_config_only(runs, shards):
    res = _cli("evaluate", "--checkpoint", str(runs / "unet" / "checkpoints" / "best"), "model.img_size=32",
               "--shards", str(shards))
    assert res.returncode == ConfigError.exit_code and "go with --model-config" in res.stderr


def test_compare_writes_one_table_of_metrics_with_intervals_size_and_speed(runs, shards, clip_eval, tmp_path):
    unet_eval = evaluate_checkpoint(runs / "unet" / "checkpoints" / "best", shards, n_boot=50)  # the default folder
    assert not list((runs / "vit_b_cls").glob("eval-*"))  # compare evaluates this one itself
    res = _cli("compare", str(runs / "unet"), str(runs / "vit_b_cls"), str(runs / "clip_zeroshot"),
               "--shards", str(shards), "--bootstrap", "50", "--out", str(tmp_path / "cmp"))
    assert res.returncode == 0, res.stderr[-3000:]
    vit_dir = tmp_path / "cmp" / "evaluations" / "vit_b_cls" / "eval-best-shards-default-test"
    assert (vit_dir / "metrics.json").is_file()  # under compare's own output
    assert not list((runs / "vit_b_cls").glob("eval-*"))  # the run folder it read is left as it was
    rows = {r["run"]: r for r in csv.DictReader((tmp_path / "cmp" / "compare.csv").open())}
    assert list(rows) == ["unet", "vit_b_cls", "clip_zeroshot"]
    unet, vit, clip = rows["unet"], rows["vit_b_cls"], rows["clip_zeroshot"]
    m, ci = unet_eval["metrics"], unet_eval["ci95"]
    assert float(unet["lung_dice"]) == pytest.approx(m["lung_dice"], rel=1e-5)
    assert [float(unet["lung_dice_ci_lo"]), float(unet["lung_dice_ci_hi"])] == pytest.approx(ci["lung_dice"], rel=1e-5)
    assert unet["accuracy"] == "" and vit["lung_dice"] == "" and clip["f1_macro"] != ""
    vit_eval = json.loads((vit_dir / "metrics.json").read_text())
    assert float(vit["f1_macro_ci_hi"]) == pytest.approx(vit_eval["ci95"]["f1_macro"][1], rel=1e-5)
    assert float(vit["precision_macro"]) == pytest.approx(vit_eval["metrics"]["precision_macro"], rel=1e-5)
    # parameters of the model the config builds; speed: the median of the run's logged img/s
    from mtlxray.model import build_model

    for name in ("unet", "vit_b_cls"):
        model = build_model(load_config(runs / name / "config.yaml").model, pretrained=False)
        assert int(rows[name]["params"]) == sum(p.numel() for p in model.parameters())
        assert float(rows[name]["gflops_forward"]) > 0
        logged = [json.loads(line) for line in (runs / name / "metrics.jsonl").read_text().splitlines()]
        speed = statistics.median(r["img_per_s"] for r in logged if r["type"] == "train")
        assert float(rows[name]["train_img_per_s"]) == pytest.approx(speed, rel=1e-5)
        assert rows[name]["train_world_size"] == "1" and rows[name]["train_steps"] == "2"
    assert clip["train_img_per_s"] == "" and clip["trained_params"] == "0"
    md = (tmp_path / "cmp" / "compare.md").read_text()
    assert md in res.stdout
    assert f"{m['lung_dice']:.3f} [{ci['lung_dice'][0]:.3f}, {ci['lung_dice'][1]:.3f}]" in md
    assert "– (not trained)" in md and "no training run" in md


def test_compare_without_an_evaluation_names_the_evaluate_command(shards, tmp_path):
    cfg = load_config(BASELINES / "deeplabv3p.yaml", baseline_overrides("deeplabv3p", shards, tmp_path, tmp_path))
    assert run_training(cfg, "none") == 0
    res = _cli("compare", str(tmp_path / "deeplabv3p"), "--out", str(tmp_path / "cmp"))
    assert res.returncode == ConfigError.exit_code
    assert "no evaluation of the test split" in res.stderr and "mtlxray evaluate --checkpoint" in res.stderr
    assert not (tmp_path / "cmp").exists()

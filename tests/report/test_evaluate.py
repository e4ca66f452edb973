"""`mtlxray evaluate` end to end on tiny shards with real (untrained) checkpoints."""

import csv
import json
import os
import re
import sys
from pathlib import Path

import killable
import pytest
from safetensors.torch import load_file, save_file

from _report_support import write_checkpoint
from tiny_data import make_tiny_shards
from mtlxray.cli import main
from mtlxray.config import load_config
from mtlxray.errors import CheckpointError, ConfigError, DataError
from mtlxray.report.evaluate import FIGURES, Case, _TopK, check_leakage, evaluate_checkpoint

REPO = Path(__file__).resolve().parents[2]
UNTRAINED = True
"""`allow_leakage` for the fixtures' checkpoints: their configs name the default `data.shards`, a
training set they never saw and that does not exist, which evaluate otherwise refuses as unchecked."""


@pytest.fixture(scope="module")
def shards64(tmp_path_factory):
    return make_tiny_shards(tmp_path_factory.mktemp("shards"), format="raw", image_size=64)


def _cli(*args: str, env: dict | None = None):
    import subprocess

    return subprocess.run([sys.executable, "-m", "mtlxray.cli", "evaluate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300, env=env)


def test_evaluate_checkpoint_writes_metrics_per_image_csv_report_and_figures(tiny_ckpt, shards64, tmp_path):
    s = evaluate_checkpoint(tiny_ckpt, shards64, split="test", subset="infection", out=tmp_path, n_boot=20,
                            allow_leakage=UNTRAINED)
    manifest = json.loads((shards64 / "manifest.json").read_text())
    m = s["metrics"]
    assert m["n_images"] == sum(manifest["counts"]["infection"]["test"].values())
    assert m["inf_n"] == manifest["counts"]["infection"]["test"]["COVID-19"]
    assert m["inf_negatives_n"] == m["n_images"] - m["inf_n"] and 0 <= m["inf_fp_share"] <= 1
    assert sum(map(sum, s["confusion"])) == m["n_images"]
    saved = json.loads((tmp_path / "metrics.json").read_text())  # strict JSON: nan written as null
    assert saved["metrics"]["lung_dice"] == pytest.approx(m["lung_dice"])
    rows = list(csv.DictReader((tmp_path / "per_image.csv").open()))
    assert len(rows) == m["n_images"] and {r["key"] for r in rows} == set(s["per_image"]["key"])
    covid = [r for r in rows if r["class"] == "COVID-19"]
    assert all(r["inf_dice"] != "" for r in covid) and all(r["inf_dice"] == "" for r in rows if r not in covid)
    assert {"p_Normal", "p_Non-COVID", "p_COVID-19", "lung_iou", "inf_area_px"} <= rows[0].keys()
    report = (tmp_path / "report.md").read_text()
    assert "COVID-19 images" in report and "Infection on negative images" in report
    for name in FIGURES.values():
        assert name in report and (tmp_path / name).stat().st_size > 1000
    # paper-ready: counts are ints, paths relative to the report, and what produced the numbers
    text = (tmp_path / "metrics.json").read_text()
    assert f'"n_images": {m["n_images"]},' in text and '"lung_n": ' in text and '.0,' not in text.split('"lung_n": ')[1][:8]
    assert f"| Images | {m['lung_n']} |" in report
    assert str(tmp_path) not in report and f"`{os.path.relpath(tiny_ckpt, tmp_path)}`" in report
    assert saved["mtlxray_version"] and saved["torch_version"] and len(saved["config_hash"]) == 12
    assert f"config hash {saved['config_hash']}" in report


def test_phase1_checkpoint_says_it_has_no_infection_head(tiny_ckpt_phase1, shards64, tmp_path):
    res = _cli("--checkpoint", str(tiny_ckpt_phase1), "--shards", str(shards64), "--split", "test",
               "--subset", "infection", "--out", str(tmp_path), "--bootstrap", "10", "--allow-leakage")
    assert res.returncode == 0, res.stderr[-2000:]
    assert "no infection head" in res.stdout and "nan" not in res.stdout
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert "inf_dice" not in saved["metrics"] and saved["subset"] == "infection"


def test_default_output_folder_names_checkpoint_shards_subset_and_split(tiny_ckpt, shards64):
    s = evaluate_checkpoint(tiny_ckpt, shards64, split="val", subset="lung", n_boot=5, allow_leakage=UNTRAINED)
    assert Path(s["out"]) == tiny_ckpt.parent.parent / f"eval-best-{shards64.name}-lung-val"
    assert (Path(s["out"]) / "metrics.json").is_file()


def test_shards_of_another_image_size_are_a_config_error(tiny_ckpt, tmp_path_factory):
    shards32 = make_tiny_shards(tmp_path_factory.mktemp("s32"), format="raw", image_size=32)
    with pytest.raises(ConfigError, match="64² model"):
        evaluate_checkpoint(tiny_ckpt, shards32, split="test", n_boot=5)
    res = _cli("--checkpoint", str(tiny_ckpt), "--shards", str(shards32), "--split", "test")
    assert res.returncode == 2 and "--image-size 64" in res.stderr


def test_a_checkpoint_with_non_finite_weights_fails_in_one_line(tiny_ckpt, shards64, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(tiny_ckpt, bad)
    weights = load_file(str(bad / "model.safetensors"))
    weights["lung_head.conv.weight"][0, 0, 0, 0] = float("nan")
    save_file(weights, str(bad / "model.safetensors"))
    res = _cli("--checkpoint", str(bad), "--shards", str(shards64), "--split", "test")
    assert res.returncode == CheckpointError.exit_code
    lines = [x for x in res.stderr.splitlines() if x.strip() and not x.startswith("[")]
    assert len(lines) == 1 and "nan or inf" in lines[0], res.stderr


@pytest.mark.distributed
def test_evaluate_two_ranks_gathers_every_image_once(tiny_ckpt, shards64, tmp_path):
    single = evaluate_checkpoint(tiny_ckpt, shards64, split="test", subset="lung", out=tmp_path / "one", n_boot=20,
                                 allow_leakage=UNTRAINED)
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "MTLXRAY_PG_TIMEOUT_S": "60", "OMP_NUM_THREADS": "1"}
    torchrun = Path(sys.executable).with_name("torchrun")
    killable.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "mtlxray.cli", "evaluate",
                  "--checkpoint", str(tiny_ckpt), "--shards", str(shards64), "--split", "test",
                  "--subset", "lung", "--out", str(tmp_path / "two"), "--bootstrap", "20", "--allow-leakage"],
                 env=env, check=True, timeout=240)
    two = json.loads((tmp_path / "two" / "metrics.json").read_text())
    assert two["world_size"] == 2
    assert two["metrics"]["n_images"] == single["metrics"]["n_images"]
    assert two["confusion"] == single["confusion"]
    assert two["metrics"]["lung_dice"] == pytest.approx(single["metrics"]["lung_dice"])
    assert two["ci95"]["lung_dice"] == pytest.approx(single["ci95"]["lung_dice"])


def test_top_k_keeps_highest_scores():
    top = _TopK(2)
    for i, score in enumerate([0.3, 0.9, 0.1, 0.5, 0.9]):
        if top.wants(score):
            top.push(score, Case(f"k{i}", score, None, None))
    assert sorted(c.key for c in top.cases()) == ["k1", "k4"]


def test_values_in_the_report_are_those_of_metrics_json(tiny_ckpt, shards64, tmp_path):
    s = evaluate_checkpoint(tiny_ckpt, shards64, split="test", subset="lung", out=tmp_path, n_boot=5,
                            allow_leakage=UNTRAINED)
    report = (tmp_path / "report.md").read_text()
    assert f"{s['metrics']['lung_dice']:.4f}" in report and f"{s['metrics']['accuracy']:.4f}" in report


def _checkpoint_trained_on(shards: Path, root: Path) -> Path:
    """A phase-1 checkpoint whose config says it was trained on `shards`."""
    return write_checkpoint(root / "run", "phase1", 0, f"data.shards={shards}")


@pytest.fixture(scope="module")
def leaky_shards(tmp_path_factory) -> Path:
    """64² shards whose val/test splits hold 6 planted copies of training images."""
    from mtlxray.data.shards import build_shards
    from mtlxray.data.synth import synthesize

    root = tmp_path_factory.mktemp("leaky")
    synthesize(root / "tree", "tiny", size=64, workers=1, progress=False, duplicates=6)
    build_shards(root / "tree", root / "shards", format="raw", shard_size=8, workers=1, image_size=64, progress=False)
    return root / "shards"


def test_a_split_sharing_images_with_the_training_data_is_refused_unless_allowed(leaky_shards, tmp_path):
    shards = leaky_shards
    ckpt = _checkpoint_trained_on(shards, tmp_path)
    with pytest.raises(DataError, match="--allow-leakage"):
        evaluate_checkpoint(ckpt, shards, split="test", subset="lung", out=tmp_path / "e", n_boot=5)
    s = evaluate_checkpoint(ckpt, shards, split="test", subset="lung", out=tmp_path / "e", n_boot=5,
                            allow_leakage=True)
    assert s["leakage"]["overlapping_images"] > 0 and s["leakage"]["checked_against"]
    assert "treat these figures as inflated" in (tmp_path / "e" / "report.md").read_text()


def test_the_report_states_a_clean_audit(shards64, tmp_path):
    s = evaluate_checkpoint(_checkpoint_trained_on(shards64, tmp_path), shards64, split="test", subset="lung",
                            out=tmp_path / "e", n_boot=5)
    assert s["leakage"]["overlapping_images"] == 0 and s["leakage"]["checked_against"]
    assert "shares **0** image(s)" in (tmp_path / "e" / "report.md").read_text()


def test_relative_training_paths_are_read_from_the_run_folder_whatever_the_working_directory(
        leaky_shards, tmp_path, monkeypatch):
    # Two phases trained from `home` with relative paths (shards, runs/, init_from), as `mtlxray train` there writes them.
    home = tmp_path / "home"
    home.mkdir()
    home = home.resolve()
    (home / "shards").symlink_to(leaky_shards)
    p1 = write_checkpoint(home / "runs" / "p1", "phase1", 0, "data.shards=shards", "data.subset=lung", "run.name=p1")
    p2 = write_checkpoint(home / "runs" / "p2", "phase2", 0, "data.shards=shards", "data.subset=infection",
                          "run.name=p2", "phase.init_from=runs/p1/checkpoints/best")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    with pytest.raises(DataError, match=r"shares \d+ image"):
        evaluate_checkpoint(p1, leaky_shards, split="test", subset="lung", out=tmp_path / "e", n_boot=0)
    audit = check_leakage(load_config(p2 / "config.yaml"), leaky_shards, "lung", "test", True, p2)
    assert audit["checked_against"] == [f"{home / 'shards'} infection/train", f"{home / 'shards'} lung/train"]
    assert audit["not_checked"] == [] and audit["overlapping_images"] > 0


def test_a_training_source_that_cannot_be_found_is_refused_unless_allowed(shards64, tmp_path):
    ckpt = write_checkpoint(tmp_path / "loose", "phase2", 0, f"data.shards={shards64}",
                            "phase.init_from=runs/gone/checkpoints/best")
    gone = r"phase.init_from \S*runs/gone/checkpoints/best: does not exist"
    with pytest.raises(DataError, match=gone + ".*--allow-leakage"):
        evaluate_checkpoint(ckpt, shards64, split="test", subset="lung", out=tmp_path / "e", n_boot=0)
    audit = check_leakage(load_config(ckpt / "config.yaml"), shards64, "lung", "test", True, ckpt)
    assert audit["checked_against"] and len(audit["not_checked"]) == 1
    assert re.fullmatch(gone, audit["not_checked"][0])


def test_a_full_disk_while_writing_the_evaluation_is_one_line_and_leaves_no_partial_result(
        tiny_ckpt_phase1, shards64, tmp_path, monkeypatch, capsys):
    import errno

    from matplotlib.figure import Figure

    def full_disk(self, fname, *args, **kwargs):  # the first figure runs out of space half-way
        Path(fname).write_bytes(b"\x89PNG partial")
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(fname))

    monkeypatch.setattr(Figure, "savefig", full_disk)
    out = tmp_path / "e"
    rc = main(["evaluate", "--checkpoint", str(tiny_ckpt_phase1), "--shards", str(shards64), "--subset", "lung",
               "--out", str(out), "--bootstrap", "0", "--allow-leakage"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert f"{out}: cannot write: No space left on device (" in err and " free there)" in err
    assert list(out.iterdir()) == []  # no figure, no metrics.json that would read as a finished evaluation


def test_evaluate_of_a_checkpoint_folder_that_does_not_exist_says_so(tmp_path, capsys):
    rc = main(["evaluate", "--checkpoint", str(tmp_path / "runs" / "nope" / "checkpoints" / "best"),
               "--shards", str(tmp_path / "shards")])
    err = capsys.readouterr().err.strip()
    assert rc == CheckpointError.exit_code and err.endswith("checkpoints/best: does not exist"), err

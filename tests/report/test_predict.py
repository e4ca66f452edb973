"""predict: input handling, bad files, output folder rules, CSV and overlays, and a real tiny
checkpoint end to end."""

import csv
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlxray.errors import DataError
from mtlxray.report.predict import Failure, collect_inputs, load_gray, to_model_input


def _write_png(path, size=(40, 30), mode="RGB"):
    arr = np.random.default_rng(0).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).convert(mode).save(path)
    return path


def test_load_gray_converts_colour_to_grayscale_at_original_size(tmp_path):
    arr = load_gray(_write_png(tmp_path / "a.png", (40, 30)))
    assert arr.shape == (30, 40) and arr.dtype == np.uint8


def test_load_gray_reads_jpeg(tmp_path):
    p = tmp_path / "a.jpg"
    Image.fromarray(np.full((20, 10, 3), 128, np.uint8)).save(p, format="JPEG")
    assert load_gray(p).shape == (20, 10)


def test_load_gray_rejects_truncated_png(tmp_path):
    p = _write_png(tmp_path / "a.png")
    p.write_bytes(p.read_bytes()[:60])
    with pytest.raises(DataError, match="a.png"):
        load_gray(p)


def test_load_gray_rejects_non_image(tmp_path):
    p = tmp_path / "notes.png"
    p.write_text("not an image")
    with pytest.raises(DataError, match="not an image"):
        load_gray(p)


def test_load_gray_refuses_images_over_the_pixel_limit(tmp_path):
    p = _write_png(tmp_path / "big.png", (100, 100))
    with pytest.raises(DataError, match="decompression-bomb"):
        load_gray(p, max_pixels=5000)


def test_load_gray_turns_pil_bomb_warning_into_error(tmp_path, monkeypatch):
    p = _write_png(tmp_path / "big.png", (100, 100))
    # between PIL's limit and twice it PIL only warns; load_gray must still refuse
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(DataError, match="decompression bomb"):
        load_gray(p, max_pixels=10**9)


def _collected(inputs):
    """collect_inputs' walk split into (files, failures)."""
    items = list(collect_inputs(inputs))
    return [i for i in items if not isinstance(i, Failure)], [i for i in items if isinstance(i, Failure)]


def test_collect_inputs_takes_folder_images_and_reports_missing_paths(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("b.png", "a.JPG", "c.jpeg"):
        _write_png(d / name)
    (d / "readme.txt").write_text("x")
    files, failures = _collected([d, tmp_path / "missing.png"])
    assert [f.name for f in files] == ["a.JPG", "b.png", "c.jpeg"]
    assert [f.path for f in failures] == [str(tmp_path / "missing.png")]


def test_collect_inputs_lists_broken_and_looping_links_instead_of_dropping_them(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _write_png(d / "good.png")
    (d / "dangling.png").symlink_to(tmp_path / "gone.png")
    (d / "self.png").symlink_to(d / "self.png")
    (d / "ping.png").symlink_to(d / "pong.png")
    (d / "pong.png").symlink_to(d / "ping.png")
    (d / "scans.png").mkdir()
    (d / "linked.png").symlink_to(d / "good.png")
    files, failures = _collected([d, tmp_path / "gone.png"])
    assert [f.name for f in files] == ["good.png", "linked.png"]
    why = {Path(f.path).name: f.error for f in failures}
    assert why == {"dangling.png": f"broken symbolic link (to {tmp_path / 'gone.png'})",
                   "ping.png": "symbolic link loop", "pong.png": "symbolic link loop", "self.png": "symbolic link loop",
                   "scans.png": "a folder (folders inside folders are not searched)",
                   "gone.png": "no such file or folder"}
    assert len(files) + len(failures) == len(list(d.iterdir())) + 1  # every entry, and the missing argument


def test_collect_inputs_walks_lazily_reading_a_folder_only_when_its_turn_comes(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    _write_png(a / "1.png")
    walk = collect_inputs([a, b])
    assert next(walk) == a / "1.png"
    _write_png(b / "2.png")  # after the first image was handed out: a listed-up-front walk misses it
    assert list(walk) == [b / "2.png"]


def test_predict_files_writes_each_batch_before_taking_the_next_input(tiny_ckpt, tmp_path):
    from mtlxray.checkpoint import load_model_from_checkpoint
    from mtlxray.report.predict import predict_files

    model, cfg = load_model_from_checkpoint(tiny_ckpt)
    first, second = _write_png(tmp_path / "first.png"), _write_png(tmp_path / "second.png")
    out = tmp_path / "o"
    written_before_second = []

    def inputs():
        yield first
        written_before_second.append((out / "masks" / "first_lung.png").is_file())
        yield Failure("missing.png", "no such file or folder")
        yield second

    records, failures = predict_files(model, cfg.model.img_size, inputs(), out, batch_size=1)
    assert written_before_second == [True]
    assert [r["name"] for r in records] == ["first", "second"]
    assert failures == [Failure("missing.png", "no such file or folder")]


def test_predict_of_only_missing_files_stops_before_creating_the_output_folder(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    assert _predict(tiny_ckpt, out, tmp_path / "missing.png") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "nothing to predict" in err and "missing.png: no such file" in err
    assert not out.exists()


def test_a_second_predict_into_a_folder_in_use_fails_at_once_and_writes_nothing(tiny_ckpt, tmp_path, capsys):
    import subprocess
    import sys

    out = tmp_path / "out"
    # Another process holds the new folder as a running predict does (the same code), until its stdin closes.
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys; from mtlxray.report.outdir import claim_output_dir\n"
         f"with claim_output_dir({str(out)!r}, ['masks'], overwrite=False, command='predict'):\n"
         "    print('held', flush=True); sys.stdin.read()"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        # even --overwrite, which would clear the holder's outputs, does not get in
        assert _predict(tiny_ckpt, out, _write_png(tmp_path / "a.png"), extra=["--overwrite"]) == 1
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"in use by pid {holder.pid}" in err
        assert [p.name for p in out.iterdir()] == [".lock"]  # no mask, no CSV of the second predict
    finally:
        holder.communicate("", timeout=30)
    assert holder.returncode == 0 and list(out.iterdir()) == []  # the holder's lock goes with it


def test_to_model_input_resizes_and_scales_to_unit_range():
    x = to_model_input([np.full((30, 50), 255, np.uint8), np.zeros((64, 64), np.uint8)], 32)
    assert x.shape == (2, 1, 32, 32)
    assert x[0].min().item() == pytest.approx(1.0) and x[1].max().item() == 0.0


def _folder_with_one_corrupt(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    _write_png(d / "good1.png", (90, 70))
    Image.fromarray(np.full((50, 50), 200, np.uint8)).save(d / "good2.jpg", format="JPEG")
    (d / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return d


def _sure_of_lung_and_infection(ckpt: Path, root: Path) -> Path:
    """A copy of the checkpoint `ckpt` whose lung and infection heads say yes at every pixel."""
    from safetensors.torch import load_file, save_file

    from mtlxray.checkpoint import WEIGHTS_NAME

    shutil.copytree(ckpt, root)
    weights = load_file(str(root / WEIGHTS_NAME))
    for head in ("lung_head", "inf_head"):
        weights[f"{head}.out.bias"].fill_(10.0)
    save_file(weights, str(root / WEIGHTS_NAME))
    return root


def test_predict_cli_processes_good_files_and_reports_the_corrupt_one(tiny_ckpt, tmp_path, capsys):
    from mtlxray.cli import main

    d = _folder_with_one_corrupt(tmp_path)
    out = tmp_path / "out"
    ckpt = _sure_of_lung_and_infection(tiny_ckpt, tmp_path / "ckpt")
    rc = main(["predict", "--checkpoint", str(ckpt), "--out", str(out), "--gate", "0.0", str(d)])
    assert rc == 1  # some input failed
    err = capsys.readouterr().err
    assert "broken.png" in err
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert [r["name"] for r in rows] == ["good1", "good2"]
    failures = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    assert [f["path"] for f in failures] == [str(d / "broken.png")]
    r = rows[0]
    assert sum(r["probs"].values()) == pytest.approx(1.0, abs=1e-4)
    assert r["predicted_class"] == max(r["probs"], key=r["probs"].get)
    with Image.open(out / "masks" / "good1_lung.png") as m:
        assert m.size == (90, 70)  # original size, not the model's
        assert set(np.unique(np.asarray(m))) <= {0, 255}
    with Image.open(out / "overlays" / "good1_overlay.png") as o:
        # the image at its own pixel grid, with the annotation band below it
        assert o.size[0] == 90 and o.size[1] > 70 and o.mode == "RGB"
    lung = np.asarray(Image.open(out / "masks" / "good1_lung.png")) > 0
    inf = np.asarray(Image.open(out / "masks" / "good1_inf.png")) > 0
    assert r["infection_reported"] and r["lung_area_px"] == lung.sum() == 90 * 70
    assert r["severity_percent"] == pytest.approx(100 * (inf & lung).sum() / lung.sum(), abs=1e-3) == 100.0


def test_predict_gate_suppresses_infection_below_threshold(tiny_ckpt, tmp_path):
    from mtlxray.report.predict import predict_files
    from mtlxray.checkpoint import load_model_from_checkpoint

    model, cfg = load_model_from_checkpoint(tiny_ckpt)
    paths = [_write_png(tmp_path / "a.png", (64, 64))]
    (ungated,), _ = predict_files(model, cfg.model.img_size, paths, tmp_path / "o1")
    (gated,), _ = predict_files(model, cfg.model.img_size, paths, tmp_path / "o2", gate=1.0)
    assert ungated["infection_reported"] is True
    assert gated["infection_reported"] is False and gated["severity_percent"] is None
    assert gated["infection_area_px"] == 0
    assert not np.asarray(Image.open(tmp_path / "o2" / "masks" / "a_inf.png")).any()


def test_predict_with_phase1_checkpoint_reports_no_infection(tiny_ckpt_phase1, tmp_path):
    from mtlxray.report.predict import predict_files
    from mtlxray.checkpoint import load_model_from_checkpoint

    model, cfg = load_model_from_checkpoint(tiny_ckpt_phase1)
    (rec,), failures = predict_files(model, cfg.model.img_size, [_write_png(tmp_path / "a.png")], tmp_path / "o")
    assert not failures
    assert rec["infection_reported"] is False and rec["severity_percent"] is None


def test_predict_files_gives_safe_distinct_names_to_same_named_inputs(tiny_ckpt, tmp_path):
    from mtlxray.report.predict import predict_files
    from mtlxray.checkpoint import load_model_from_checkpoint

    model, cfg = load_model_from_checkpoint(tiny_ckpt)
    (tmp_path / "x").mkdir()
    (tmp_path / "y").mkdir()
    paths = [_write_png(tmp_path / "x" / "scan (1).png"), _write_png(tmp_path / "y" / "scan (1).png")]
    recs, _ = predict_files(model, cfg.model.img_size, paths, tmp_path / "o")
    assert [r["name"] for r in recs] == ["scan_1", "scan_1-1"]
    assert (tmp_path / "o" / "masks" / "scan_1-1_lung.png").is_file()


# --- outputs: CSV, overlays, folder rules, modes ----------------------------------------------------


def _predict(ckpt, out, *inputs, extra=()):
    from mtlxray.cli import main

    return main(["predict", "--checkpoint", str(ckpt), "--out", str(out), *extra, *map(str, inputs)])


def test_predict_writes_csv_beside_jsonl_with_the_same_records(tiny_ckpt, tmp_path):
    from mtlxray import CLASS_NAMES

    d = _folder_with_one_corrupt(tmp_path)
    assert _predict(tiny_ckpt, tmp_path / "out", d, extra=["--gate", "0.0"]) == 1
    rows = [json.loads(line) for line in (tmp_path / "out" / "predictions.jsonl").read_text().splitlines()]
    with open(tmp_path / "out" / "predictions.csv", newline="") as f:
        table = list(csv.DictReader(f))
    assert [t["name"] for t in table] == [r["name"] for r in rows] == ["good1", "good2"]
    assert list(table[0]) == ["file", "name", "width", "height", "predicted_class",
                              *(f"p_{c}" for c in CLASS_NAMES), "infection_reported", "lung_area_px",
                              "infection_area_px", "severity_percent", "gate_probability", "gate_passed",
                              "boxes", "boxes_ungated"]
    for t, r in zip(table, rows):
        assert t["predicted_class"] == r["predicted_class"] and int(t["width"]) == r["width"]
        assert [float(t[f"p_{c}"]) for c in CLASS_NAMES] == [r["probs"][c] for c in CLASS_NAMES]
        assert int(t["lung_area_px"]) == r["lung_area_px"]
        assert (t["severity_percent"] == "") == (r["severity_percent"] is None)


def test_predict_overlay_shows_class_probability_severity_and_legend(tiny_ckpt, tmp_path, monkeypatch):
    from mtlxray.report import figures
    from mtlxray.report import predict as P

    seen = []

    def spy(image, lung, inf, **kw):
        seen.append(dict(kw, has_inf=inf is not None))
        return figures.prediction_overlay(image, lung, inf, **kw)

    monkeypatch.setattr(P, "prediction_overlay", spy)
    model, cfg = P.load_predictor(tiny_ckpt)
    paths = [_write_png(tmp_path / "a.png", (64, 48))]
    (rec,), _ = P.predict_files(model, cfg.model.img_size, paths, tmp_path / "o")
    (gated,), _ = P.predict_files(model, cfg.model.img_size, paths, tmp_path / "g", gate=1.0)
    assert seen[0]["predicted_class"] == rec["predicted_class"]
    assert seen[0]["probability"] == pytest.approx(rec["probs"][rec["predicted_class"]], abs=1e-6)
    assert seen[0]["severity"] == pytest.approx(rec["severity_percent"], abs=1e-3) and seen[0]["has_inf"]
    assert seen[1]["severity"] is None and "gate" in seen[1]["note"] and not seen[1]["has_inf"]
    overlay = np.asarray(Image.open(tmp_path / "o" / "overlays" / "a_overlay.png"))
    lung = np.asarray(Image.open(tmp_path / "o" / "masks" / "a_lung.png")) > 0
    inf = np.asarray(Image.open(tmp_path / "o" / "masks" / "a_inf.png")) > 0
    image = P.load_gray(paths[0])
    assert np.array_equal(overlay[:48], figures.overlay_rgb(image, lung, inf))  # same pixel grid
    band = overlay[48:].reshape(-1, 3)
    assert (band == np.round(np.array(figures.LUNG_RGB) * 255).astype(np.uint8)).all(1).any()  # legend swatch
    assert (band.max(1) > 200).any()  # white text


def test_predict_refuses_a_used_output_folder_without_overwrite(tiny_ckpt, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert _predict(tiny_ckpt, out, _write_png(tmp_path / "a.png")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "not empty" in err and "--overwrite" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_predict_overwrite_leaves_no_stale_masks_or_errors(tiny_ckpt, tmp_path):
    d = _folder_with_one_corrupt(tmp_path)
    out = tmp_path / "out"
    assert _predict(tiny_ckpt, out, d) == 1
    assert (out / "errors.jsonl").is_file() and (out / "masks" / "good2_lung.png").is_file()
    (out / "notes.txt").write_text("mine")
    assert _predict(tiny_ckpt, out, d / "good1.png", extra=["--overwrite"]) == 0
    assert not (out / "errors.jsonl").exists()
    assert sorted(p.name for p in (out / "masks").iterdir()) == ["good1_inf.png", "good1_lung.png"]
    assert sorted(p.name for p in (out / "overlays").iterdir()) == ["good1_overlay.png"]
    assert len((out / "predictions.csv").read_text().splitlines()) == 2
    assert (out / "notes.txt").read_text() == "mine"  # not predict's: kept


def test_predict_into_an_unwritable_folder_is_a_one_line_error(tiny_ckpt, tmp_path, capsys):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")  # a folder cannot be made under a file, whoever runs the test
    assert _predict(tiny_ckpt, blocker / "out", _write_png(tmp_path / "a.png")) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "cannot write there" in err and "Traceback" not in err
    assert _predict(tiny_ckpt, blocker, _write_png(tmp_path / "b.png")) == 2  # --out is a file
    assert "not a folder" in capsys.readouterr().err


@pytest.mark.parametrize("gate", ["1.5", "-0.1", "nan", "high"])
def test_predict_gate_outside_0_1_is_a_usage_error_with_exit_2(tiny_ckpt, tmp_path, capsys, gate):
    with pytest.raises(SystemExit) as e:
        _predict(tiny_ckpt, tmp_path / "out", _write_png(tmp_path / "a.png"), extra=["--gate", gate])
    assert e.value.code == 2
    assert "--gate" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_predict_files_rejects_a_bad_gate_from_python(tiny_ckpt, tmp_path):
    from mtlxray.errors import ConfigError
    from mtlxray.report.predict import load_predictor, predict_files

    model, cfg = load_predictor(tiny_ckpt)
    with pytest.raises(ConfigError, match="gate"):
        predict_files(model, cfg.model.img_size, [], tmp_path / "o", gate=1.5)


def test_predict_and_export_help_text_for_every_option_and_no_literal_percent(capsys):
    import argparse

    from mtlxray.cli import build_parser, main

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    for name in ("predict", "export"):
        for action in sub.choices[name]._actions:
            assert action.help and action.help != argparse.SUPPRESS, (name, action.dest)
    with pytest.raises(SystemExit):
        main(["predict", "--help"])
    text = capsys.readouterr().out
    assert "%%" not in text and "in %)" in text
    assert "--batch-size N" in text and "--overwrite" in text


def test_predict_accepts_a_save_pretrained_folder(tiny_ckpt, tmp_path):
    from mtlxray.checkpoint import load_model_from_checkpoint

    model, cfg = load_model_from_checkpoint(tiny_ckpt)
    folder = model.save_pretrained(tmp_path / "model", cfg)
    assert sorted(p.name for p in folder.iterdir()) == ["config.yaml", "model.safetensors"]
    assert _predict(folder, tmp_path / "a", _write_png(tmp_path / "x.png")) == 0
    assert _predict(tiny_ckpt, tmp_path / "b", tmp_path / "x.png") == 0
    assert (tmp_path / "a" / "predictions.jsonl").read_text() == (tmp_path / "b" / "predictions.jsonl").read_text()


def test_predict_outputs_keep_the_umask_mode(tiny_ckpt, tmp_path):
    old = os.umask(0o022)
    try:
        assert _predict(tiny_ckpt, tmp_path / "out", _folder_with_one_corrupt(tmp_path)) == 1
    finally:
        os.umask(old)
    files = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert {p.name for p in files} >= {"predictions.jsonl", "predictions.csv", "errors.jsonl", "good1_overlay.png"}
    assert {oct(p.stat().st_mode & 0o777) for p in files} == {"0o644"}


def test_predict_names_the_checkpoints_own_classes_and_uses_sigmoids_for_a_multilabel_head(tmp_path):
    """A 2-class multi-label checkpoint: its class names in JSON and CSV, each probability a sigmoid."""
    import torch

    from mtlxray.checkpoint import load_model_from_checkpoint
    from mtlxray.report.predict import predict_files, predictions_csv

    from _report_support import write_checkpoint

    ckpt = write_checkpoint(tmp_path / "run", "phase2", 0, "model.num_classes=2", "model.cls_loss=bce_multilabel",
                            "data.label_map={Normal: 0, Non-COVID: 0, COVID-19: 1}",
                            "data.class_names=[other, COVID-19]", "phase.positive_classes=[1]")
    model, cfg = load_model_from_checkpoint(ckpt)
    image = _write_png(tmp_path / "a.png", size=(64, 64), mode="L")
    recs, _ = predict_files(model, cfg.model.img_size, [image], tmp_path / "o")
    assert list(recs[0]["probs"]) == ["other", "COVID-19"]
    with torch.no_grad():
        x = torch.from_numpy(np.asarray(Image.open(image), dtype=np.float32))[None, None] / 255.0
        expected = torch.sigmoid(model(x)["cls"].float())[0]
    assert [recs[0]["probs"][c] for c in ("other", "COVID-19")] == pytest.approx(expected.tolist(), abs=1e-5)
    assert "p_other,p_COVID-19" in predictions_csv(recs).splitlines()[0]

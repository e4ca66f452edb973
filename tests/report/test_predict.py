"""predict: input handling, bad files, and a real tiny checkpoint end to end."""

import json

import numpy as np
import pytest
from PIL import Image

from mtlxray.errors import DataError
from mtlxray.report.predict import collect_inputs, load_gray, to_model_input


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


def test_collect_inputs_takes_folder_images_and_reports_missing_paths(tmp_path):
    d = tmp_path / "in"
    d.mkdir()
    for name in ("b.png", "a.JPG", "c.jpeg"):
        _write_png(d / name)
    (d / "readme.txt").write_text("x")
    files, failures = collect_inputs([d, tmp_path / "missing.png"])
    assert [f.name for f in files] == ["a.JPG", "b.png", "c.jpeg"]
    assert [f.path for f in failures] == [str(tmp_path / "missing.png")]


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


def test_predict_cli_processes_good_files_and_reports_the_corrupt_one(tiny_ckpt, tmp_path, capsys):
    from mtlxray.cli import main

    d = _folder_with_one_corrupt(tmp_path)
    out = tmp_path / "out"
    rc = main(["predict", "--checkpoint", str(tiny_ckpt), "--out", str(out), str(d)])
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
        assert o.size == (90, 70) and o.mode == "RGB"
    lung = np.asarray(Image.open(out / "masks" / "good1_lung.png")) > 0
    inf = np.asarray(Image.open(out / "masks" / "good1_inf.png")) > 0
    assert r["lung_area_px"] == lung.sum()
    if r["lung_area_px"]:
        assert r["severity_percent"] == pytest.approx(100 * (inf & lung).sum() / lung.sum(), abs=1e-3)


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

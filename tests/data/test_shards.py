"""Shard builder: manifest counts, determinism, atomic no-op rebuilds, bad inputs, both layouts."""

import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mtlxray.cli import main as cli
from mtlxray.data.shards import build_shards
from mtlxray.data.synth import SCALE_COUNTS
from tiny_data import write_png
from mtlxray.errors import DataError

TRAIN = Path("Lung Segmentation Data/Lung Segmentation Data/Train")


def _build(src: Path, out: Path, **kw) -> dict:
    return build_shards(src, out, workers=1, progress=False, **kw)


def test_tiny_manifest_counts_equal_the_scale_counts(tiny_shards):
    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    assert manifest["counts"] == SCALE_COUNTS["tiny"]
    assert manifest["format"] == "raw" and manifest["image_size"] == 64 and manifest["skipped"] == 0


def test_manifest_lists_every_shard_with_samples_bytes_and_sha256(tiny_shards):
    import hashlib

    manifest = json.loads((tiny_shards / "manifest.json").read_text())
    for subset, splits in manifest["shards"].items():
        for split, entries in splits.items():
            assert sum(e["samples"] for e in entries) == sum(manifest["counts"][subset][split].values())
            for e in entries:
                path = tiny_shards / e["path"]
                assert e["path"].startswith(f"{subset}/{split}-") and path.stat().st_size == e["bytes"]
                assert hashlib.sha256(path.read_bytes()).hexdigest() == e["sha256"]
                with tarfile.open(path) as tar:
                    names = tar.getnames()
                assert len(names) == 5 * e["samples"]  # img, lung, inf, cls.json, box.json
    assert not list(tiny_shards.rglob("*.tmp"))


def test_sample_keys_are_unique_and_free_of_dots_and_spaces(tiny_shards):
    keys = []
    for tar_path in tiny_shards.rglob("*.tar"):
        with tarfile.open(tar_path) as tar:
            keys += [n.split(".", 1)[0] for n in tar.getnames() if n.endswith(".cls.json")]
    assert len(keys) == len(set(keys)) == 46
    assert all(" " not in k and "(" not in k for k in keys)
    assert "lung_train_Non-COVID_non_COVID_1" in keys


def test_rerun_is_a_noop_and_a_fresh_build_is_byte_identical(tiny_tree, tiny_shards, tmp_path):
    manifest_path = tiny_shards / "manifest.json"
    before = manifest_path.stat().st_mtime_ns
    _build(tiny_tree, tiny_shards, format="raw", shard_size=4, image_size=64)
    assert manifest_path.stat().st_mtime_ns == before
    fresh = _build(tiny_tree, tmp_path / "again", format="raw", shard_size=4, image_size=64)
    old = json.loads(manifest_path.read_text())
    assert fresh["shards"] == old["shards"]  # same paths, sizes and sha256


def test_png_and_raw_builds_hold_the_same_counts(tiny_shards, tiny_shards_png):
    raw = json.loads((tiny_shards / "manifest.json").read_text())
    png = json.loads((tiny_shards_png / "manifest.json").read_text())
    assert png["format"] == "png" and png["counts"] == raw["counts"]


def test_images_are_resized_to_256_by_default(mini_qu_ex, tmp_path):
    out = tmp_path / "out"
    _build(mini_qu_ex, out, format="raw")
    with tarfile.open(next((out / "lung").glob("train-*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name.endswith(".img.raw"))
        assert member.size == 256 * 256


def _corrupt(root: Path) -> Path:
    p = root / TRAIN / "Normal/images/Normal (1).png"
    p.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return p


def _no_mask(root: Path) -> Path:
    (root / TRAIN / "Normal/lung masks/Normal (1).png").unlink()
    return root / TRAIN / "Normal/images/Normal (1).png"


def _mask_size(root: Path) -> Path:
    write_png(root / TRAIN / "Normal/lung masks/Normal (1).png", np.zeros((16, 16), np.uint8))
    return root / TRAIN / "Normal/images/Normal (1).png"


def _mask_values(root: Path) -> Path:
    write_png(root / TRAIN / "Normal/lung masks/Normal (1).png", np.full((32, 32), 128, np.uint8))
    return root / TRAIN / "Normal/images/Normal (1).png"


def _empty_class(root: Path) -> Path:
    for p in (root / TRAIN / "Normal/images").iterdir():
        p.unlink()
    return root / TRAIN / "Normal"


@pytest.mark.parametrize("damage, reason, dropped", [
    (_corrupt, "not an image PIL can read", 1),
    (_no_mask, "image without a mask", 1),
    (_mask_size, "size 16x16 differs from image 32x32", 1),
    (_mask_values, r"values \[128\] are not in \{0,1\} or \{0,255\}", 1),
    (_empty_class, "empty class folder", 2),
])
def test_bad_input_fails_naming_the_path_or_is_skipped_and_recorded(mini_qu_ex, tmp_path, damage, reason, dropped):
    bad_path = damage(mini_qu_ex)
    with pytest.raises(DataError, match=reason) as err:
        _build(mini_qu_ex, tmp_path / "fail")
    assert str(bad_path) in str(err.value)
    assert not (tmp_path / "fail" / "manifest.json").exists()
    assert not list((tmp_path / "fail").rglob("*.tmp")) and not list((tmp_path / "fail").rglob("*.tar"))

    manifest = _build(mini_qu_ex, tmp_path / "skip", skip_bad=True)
    skipped = [json.loads(line) for line in (tmp_path / "skip" / "skipped.jsonl").read_text().splitlines()]
    assert [s["path"] for s in skipped] == [str(bad_path)] and reason.split("\\")[0] in skipped[0]["reason"]
    assert manifest["skipped"] == 1
    assert manifest["counts"]["lung"]["train"]["Normal"] == 2 - dropped


def test_rgb_image_is_converted_and_noted(mini_qu_ex, tmp_path):
    path = mini_qu_ex / TRAIN / "COVID-19/images/covid_1.png"
    gray = np.asarray(Image.open(path))
    rgb = np.stack([gray] * 3, -1)
    Image.fromarray(rgb, "RGB").save(path)
    manifest = _build(mini_qu_ex, tmp_path / "out", format="raw", image_size=32)
    assert manifest["converted"] == 1 and manifest["skipped"] == 0
    notes = (tmp_path / "out" / "notes.jsonl").read_text()
    assert "covid_1.png" in notes and "RGB image converted to grayscale" in notes
    with tarfile.open(next((tmp_path / "out/lung").glob("train-*.tar"))) as tar:
        member = next(m for m in tar.getmembers() if m.name == "lung_train_COVID-19_covid_1.img.raw")
        stored = np.frombuffer(tar.extractfile(member).read(), np.uint8).reshape(32, 32)
    np.testing.assert_array_equal(stored, gray)


def test_radiography_build_maps_four_classes_and_resizes_masks(radiography_tree, tmp_path):
    manifest = _build(radiography_tree, tmp_path / "out", layout="radiography", format="raw", seed=0)
    assert manifest["counts"]["lung"]["train"] == {"Normal": 8, "Lung_Opacity": 8, "Viral Pneumonia": 8, "COVID": 8}
    assert manifest["counts"]["lung"]["val"] == {"Normal": 2, "Lung_Opacity": 2, "Viral Pneumonia": 2, "COVID": 2}
    assert manifest["label_map"]["lung"] == {"Normal": 0, "Lung_Opacity": 1, "Viral Pneumonia": 1, "COVID": 2}
    assert manifest["classes"]["lung"] == ["Normal", "Lung_Opacity", "Viral Pneumonia", "COVID"]
    assert manifest["image_size"] == 256


def test_cli_build_then_info_prints_table_style_counts(mini_qu_ex, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["shards", "build", "--input", str(mini_qu_ex), "--output", str(out), "--workers", "1"]) == 0
    capsys.readouterr()
    assert cli(["shards", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "lung segmentation subset (6 images)" in text
    assert any(line.split() == ["Non-COVID", "2"] for line in text.splitlines())
    assert cli(["shards", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["lung"]["train"]["COVID-19"] == 2


def test_cli_reports_a_folder_in_neither_layout_on_one_line(tmp_path, capsys):
    assert cli(["shards", "build", "--input", str(tmp_path), "--output", str(tmp_path / "o")]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "expected 'Lung Segmentation Data/Lung Segmentation Data/Train'" in err


def test_cli_image_size_flag_sets_the_stored_size(mini_qu_ex, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli(["shards", "build", "--input", str(mini_qu_ex), "--output", str(out), "--workers", "1",
                "--format", "raw", "--image-size", "48"]) == 0
    assert json.loads((out / "manifest.json").read_text())["image_size"] == 48
    with tarfile.open(next((out / "lung").glob("train-*.tar"))) as tar:
        assert next(m for m in tar.getmembers() if m.name.endswith(".img.raw")).size == 48 * 48


def test_build_without_output_refuses_to_replace_another_kind_of_set(mini_qu_ex, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    base = ["shards", "build", "--input", str(mini_qu_ex), "--workers", "1", "--image-size", "32"]
    assert cli(base + ["--format", "raw"]) == 0
    manifest = tmp_path / "shards" / "synthetic" / "manifest.json"
    before = manifest.read_bytes()
    capsys.readouterr()
    assert cli(base + ["--format", "png"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "shards/synthetic already holds another shard set (format raw); pass --output" in err
    assert cli(base + ["--format", "raw", "--image-size", "16"]) == 2
    assert manifest.read_bytes() == before  # untouched
    assert cli(base + ["--format", "raw"]) == 0  # the same kind of set: an up-to-date no-op
    assert manifest.read_bytes() == before
    assert cli(base + ["--format", "png", "--output", "shards/synthetic"]) == 0  # explicit: rebuilt
    assert json.loads(manifest.read_text())["format"] == "png"


def test_info_into_a_closed_pipe_prints_no_broken_pipe_error(tiny_shards):
    import subprocess
    import sys

    for extra in (["--json"], []):
        proc = subprocess.Popen([sys.executable, "-m", "mtlxray.cli", "shards", "info", str(tiny_shards), *extra],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        proc.stdout.close()  # the reader is gone before anything is written: `| head` at its limit
        err = proc.stderr.read().decode()
        assert proc.wait(timeout=120) == 0
        assert "BrokenPipeError" not in err and "Traceback" not in err, err
    shell = subprocess.run(f"'{sys.executable}' -m mtlxray.cli shards info '{tiny_shards}' --json | head -n 2",
                           shell=True, capture_output=True, text=True, timeout=120)
    assert shell.stdout.count("\n") == 2 and shell.stderr == ""


def test_info_checks_a_radiography_build_against_the_release(radiography_tree, tmp_path, capsys):
    from mtlxray.data.shards import format_tables, release_check
    from mtlxray.data.sources import RADIOGRAPHY_RELEASE

    out = tmp_path / "out"
    _build(radiography_tree, out, layout="radiography", format="raw", image_size=32)
    assert cli(["shards", "info", str(out)]) == 0
    text = capsys.readouterr().out
    assert "Radiography DB: DIFFERS from the release (40 of 21,165 images): COVID 10 of 3,616 (-3,606)" in text
    manifest = json.loads((out / "manifest.json").read_text())
    manifest["counts"] = {"lung": {"train": {c: n - n // 5 for c, n in RADIOGRAPHY_RELEASE.items()},
                                   "val": {c: n // 5 for c, n in RADIOGRAPHY_RELEASE.items()}}}
    assert release_check(manifest).startswith("Radiography DB: matches the release (21,165 images: COVID 3,616")
    assert "matches the release" in format_tables(manifest)
    assert release_check(json.loads((tiny_manifest := out / "manifest.json").read_text()) | {"layout": "covid-qu-ex"}) is None
    assert tiny_manifest.is_file()


def test_built_files_respect_the_umask(mini_qu_ex, tmp_path):
    import os

    old = os.umask(0o022)
    try:
        out = tmp_path / "out"
        _build(mini_qu_ex, out, format="raw", image_size=32)
    finally:
        os.umask(old)
    for path in [out / "manifest.json", *out.rglob("*.tar")]:
        assert path.stat().st_mode & 0o777 == 0o644, path
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no staging folder left


@pytest.mark.parametrize("n_samples", [0, 1, 7])
def test_shard_tar_bytes_equal_webdatasets_writer(n_samples):
    """The build's own tar writer (faster) writes exactly what webdataset.TarWriter writes, long
    member names (a PAX header) and sizes off the 512-byte blocks included."""
    import hashlib
    import io

    import webdataset as wds

    from mtlxray.data.shards import _ShardTar

    rng = np.random.default_rng(n_samples)
    samples = [{"__key__": f"lung_train_Normal_{'x' * (120 if k % 2 else 3)}_{k}",
                "img.raw": rng.integers(0, 256, 700 + k, dtype=np.uint8).tobytes(), "cls.json": b'{"label": 0}',
                "box.json": b"[]"} for k in range(n_samples)]
    ours, theirs = io.BytesIO(), io.BytesIO()
    writer = _ShardTar(ours)
    for s in samples:
        writer.write(s)
    writer.close()
    with wds.TarWriter(theirs, encoder=False, mtime=0, user="mtlxray", group="mtlxray", mode=0o444) as w:
        for s in samples:
            w.write(s)
    assert ours.getvalue() == theirs.getvalue()
    assert writer.digest.hexdigest() == hashlib.sha256(theirs.getvalue()).hexdigest()

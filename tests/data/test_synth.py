"""Synthetic phantoms: COVID-QU-Ex layout, exact counts, exact masks, determinism, learnable classes."""

import hashlib
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

from mtlxray import CLASS_NAMES
from mtlxray.cli import main as cli
from mtlxray.data.synth import SCALE_COUNTS, PhantomSpec, plan, render_phantom, synthesize

TABLE_I = {  # lung subset, Train / Val / Test
    "Normal": (6849, 1712, 2140), "Non-COVID": (7208, 1802, 2253), "COVID-19": (7658, 1903, 2395)}
TABLE_II = {  # infection subset
    "Normal": (932, 233, 291), "Non-COVID": (932, 233, 292), "COVID-19": (1864, 466, 583)}


def _tree_hashes(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*.png"))}


def test_paper_plan_matches_table_i_and_table_ii_without_rendering():
    specs = plan("paper")
    counts = Counter((s.subset, s.split, s.class_name) for s in specs)
    for subset, table in (("lung", TABLE_I), ("infection", TABLE_II)):
        for c, per_split in table.items():
            assert tuple(counts[(subset, split, c)] for split in ("train", "val", "test")) == per_split
    assert len(specs) == 33920 + 5826
    assert len({s.folder / s.name for s in specs}) == len(specs)  # no file written twice


def test_file_names_follow_the_real_release():
    names = {c: PhantomSpec("lung", "train", c, 84).name for c in CLASS_NAMES}
    assert names == {"Normal": "Normal (84).png", "Non-COVID": "non_COVID (84).png", "COVID-19": "covid_84.png"}


def test_cli_tiny_scale_writes_exact_counts_in_the_covid_qu_ex_layout(tmp_path):
    assert cli(["synth", "--output", str(tmp_path), "--scale", "tiny", "--size", "48", "--workers", "1"]) == 0
    for subset, top in (("lung", "Lung Segmentation Data"), ("infection", "Infection Segmentation Data")):
        for split, split_dir in (("train", "Train"), ("val", "Val"), ("test", "Test")):
            for c in CLASS_NAMES:
                folder = tmp_path / top / top / split_dir / c
                images = sorted(p.name for p in (folder / "images").iterdir())
                assert len(images) == SCALE_COUNTS["tiny"][subset][split][c]
                assert sorted(p.name for p in (folder / "lung masks").iterdir()) == images
                if subset == "infection":
                    assert sorted(p.name for p in (folder / "infection masks").iterdir()) == images
                else:
                    assert not (folder / "infection masks").exists()
                with Image.open(folder / "images" / images[0]) as im:
                    assert im.mode == "L" and im.size == (48, 48)


def test_same_seed_gives_identical_files_for_any_worker_count(tmp_path):
    synthesize(tmp_path / "a", "tiny", seed=3, size=40, workers=1, progress=False)
    synthesize(tmp_path / "b", "tiny", seed=3, size=40, workers=2, progress=False)
    synthesize(tmp_path / "c", "tiny", seed=4, size=40, workers=1, progress=False)
    a, b, c = (_tree_hashes(tmp_path / n) for n in "abc")
    assert a == b
    assert a.keys() == c.keys() and a != c


def test_masks_are_exact_and_infection_is_bilateral_inside_the_lungs():
    for i in range(6):
        for c in CLASS_NAMES:
            img, lung, inf = render_phantom(np.random.default_rng([7, i]), c, 128)
            assert img.dtype == np.uint8 and lung.any()
            assert lung[:, :64].any() and lung[:, 64:].any()  # two lung fields
            assert not (inf & ~lung).any()
            if c == "COVID-19":
                assert inf[:, :64].any() and inf[:, 64:].any()  # bilateral
                assert inf[:64].sum() < inf[64:].sum()  # lower zone
            else:
                assert not inf.any()


def test_classes_are_separable_from_the_pixels_alone():
    # A CNN test costs minutes on 2 busy cores; a ridge classifier on image-only features
    # (intensity histogram + 8x8 pooled image) is a cheaper, stricter lower bound.
    def data(seed: int, n: int) -> tuple[np.ndarray, np.ndarray]:
        xs, ys = [], []
        for i in range(n):
            for label, c in enumerate(CLASS_NAMES):
                img = render_phantom(np.random.default_rng([seed, i, label]), c, 64)[0] / 255.0
                hist = np.histogram(img, bins=32, range=(0, 1))[0] / img.size
                pooled = img.reshape(8, 8, 8, 8).mean(axis=(1, 3)).ravel()
                xs.append(np.concatenate([hist, pooled, [1.0]]))
                ys.append(label)
        return np.stack(xs), np.array(ys)

    (x, y), (xt, yt) = data(0, 40), data(1, 20)
    w = np.linalg.solve(x.T @ x + 1e-2 * np.eye(x.shape[1]), x.T @ np.eye(3)[y])
    accuracy = (np.argmax(xt @ w, 1) == yt).mean()
    assert accuracy > 0.8  # chance is 1/3


def test_cli_duplicates_plants_known_copies_and_keeps_the_counts(tmp_path):
    import json

    assert cli(["synth", "--output", str(tmp_path), "--scale", "tiny", "--size", "64", "--workers", "1",
                "--duplicates", "4"]) == 0
    planted = json.loads((tmp_path / "duplicates.json").read_text())
    assert [p["kind"] for p in planted] == ["exact", "near", "exact", "near"]
    for p in planted:
        src, dst = (np.asarray(Image.open(tmp_path / p[k])) for k in ("source", "copy"))
        assert ("/Train/" in p["source"]) and ("/Train/" not in p["copy"])
        assert np.array_equal(src, dst) == (p["kind"] == "exact")
    assert sum(1 for _ in tmp_path.rglob("images/*.png")) == 46

"""Dataset readers: COVID-QU-Ex subsets and the Radiography DB with its seeded stratified split."""

import pytest

from mtlxray.data.sources import RADIOGRAPHY_LABELS, list_covid_qu_ex, list_radiography, list_source
from mtlxray.data.synth import SCALE_COUNTS
from mtlxray.errors import DataError


def test_covid_qu_ex_lists_every_image_with_its_masks_and_label(tiny_tree):
    listing = list_covid_qu_ex(tiny_tree)
    assert not listing.bad
    total = sum(n for sub in SCALE_COUNTS["tiny"].values() for split in sub.values() for n in split.values())
    assert len(listing.records) == total
    for rec in listing.records:
        assert rec.lung_mask.name == rec.image.name and rec.lung_mask.is_file()
        assert rec.label == {"Normal": 0, "Non-COVID": 1, "COVID-19": 2}[rec.class_name]
        assert (rec.inf_mask is not None) == (rec.subset == "infection")
    assert listing.classes == {"lung": ["Normal", "Non-COVID", "COVID-19"],
                               "infection": ["Normal", "Non-COVID", "COVID-19"]}


def test_missing_infection_mask_is_allowed_for_normal_but_bad_for_covid(tiny_tree, tmp_path):
    import shutil

    root = tmp_path / "tree"
    shutil.copytree(tiny_tree, root)
    inf_root = root / "Infection Segmentation Data" / "Infection Segmentation Data" / "Train"
    normal = sorted((inf_root / "Normal" / "infection masks").iterdir())[0]
    covid = sorted((inf_root / "COVID-19" / "infection masks").iterdir())[0]
    normal.unlink()
    covid.unlink()
    listing = list_covid_qu_ex(root)
    assert [b.path for b in listing.bad] == [str(inf_root / "COVID-19" / "images" / covid.name)]
    assert "image without a mask" in listing.bad[0].reason
    rec = next(r for r in listing.records if r.image.name == normal.name and r.subset == "infection")
    assert rec.inf_mask is None


def test_folder_in_neither_layout_names_the_expected_folder(tmp_path):
    (tmp_path / "something").mkdir()
    with pytest.raises(DataError, match="expected 'Lung Segmentation Data/Lung Segmentation Data/Train'"):
        list_source("covid-qu-ex", tmp_path)
    with pytest.raises(DataError, match="expected class folders 'Normal/images'"):
        list_source("radiography", tmp_path)


def test_radiography_split_is_stratified_80_20_and_deterministic_per_seed(radiography_tree):
    a = list_radiography(radiography_tree, seed=0)
    b = list_radiography(radiography_tree, seed=0)
    c = list_radiography(radiography_tree, seed=5)
    split = lambda listing: {(r.image.name, r.split) for r in listing.records}  # noqa: E731
    assert split(a) == split(b) and split(a) != split(c)
    for cls in RADIOGRAPHY_LABELS:
        splits = [r.split for r in a.records if r.class_name == cls]
        assert splits.count("val") == 2 and splits.count("train") == 8
    assert {r.class_name: r.label for r in a.records} == RADIOGRAPHY_LABELS
    assert all(r.subset == "lung" and r.inf_mask is None for r in a.records)

"""Readers for the on-disk dataset layouts. Each yields `Record`s plus `BadInput`s it found while listing.

- COVID-QU-Ex (`covid-qu-ex`): `Lung Segmentation Data/Lung Segmentation Data/{Train,Val,Test}/<class>/
  {images,lung masks}` and `Infection Segmentation Data/Infection Segmentation Data/.../{images,lung masks,
  infection masks}`. Classes COVID-19, Non-COVID, Normal map to labels 2, 1, 0.
- COVID-19 Radiography Database (`radiography`): `<class>/images/*.png` and `<class>/masks/*.png` (lung
  masks). With the `covid3` label scheme (the default) its classes fold onto the three labels as
  `RADIOGRAPHY_LABELS` says: Lung_Opacity and Viral Pneumonia are both non-COVID disease; with
  `radiography4` they keep their own labels (`CLASS_SCHEMES`). There are no official splits;
  `split_stratified` makes a seeded 80/20 one. `RADIOGRAPHY_RELEASE` holds the release's counts.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from mtlxray import CLASS_NAMES
from mtlxray.errors import DataError

__all__ = [
    "SUBSET_DIRS", "SPLIT_DIRS", "Record", "BadInput", "Listing", "QU_EX_LABELS", "RADIOGRAPHY_LABELS", "list_covid_qu_ex",
    "list_radiography", "list_source", "split_stratified", "source_fingerprint", "CLASS_SCHEMES", "RADIOGRAPHY_RELEASE",
    "scheme_labels",
]

SUBSET_DIRS = {"lung": "Lung Segmentation Data", "infection": "Infection Segmentation Data"}
"""Subset -> top folder name of the COVID-QU-Ex release (it appears twice in the path)."""
SPLIT_DIRS = {"train": "Train", "val": "Val", "test": "Test"}
"""Split -> folder name in the COVID-QU-Ex release."""
QU_EX_LABELS = {name: label for label, name in enumerate(CLASS_NAMES)}
"""COVID-QU-Ex class folder -> label."""
RADIOGRAPHY_LABELS = {"Normal": 0, "Lung_Opacity": 1, "Viral Pneumonia": 1, "COVID": 2}
"""Radiography DB class folder -> label (0 Normal, 1 Non-COVID, 2 COVID-19)."""
RADIOGRAPHY_RELEASE = {"COVID": 3616, "Lung_Opacity": 6012, "Normal": 10192, "Viral Pneumonia": 1345}
"""Images per class in the COVID-19 Radiography Database release (21,165 in all)."""

CLASS_SCHEMES: dict[str, dict] = {
    "covid3": {"names": list(CLASS_NAMES), "labels": {**QU_EX_LABELS, **RADIOGRAPHY_LABELS}},
    # Normal, Lung_Opacity and COVID keep the covid3 indices (0, 1, 2), so label 2 is COVID in both
    # schemes and a 4-class label folds back to 3 classes by mapping 3 (Viral Pneumonia) to 1.
    "radiography4": {"names": ["Normal", "Lung_Opacity", "COVID", "Viral Pneumonia"],
                     "labels": {"Normal": 0, "Lung_Opacity": 1, "COVID": 2, "Viral Pneumonia": 3}},
}
"""Label schemes (`data.classes`, `shards build --classes`): class names in label order, and the
class folder name -> label of every source class the scheme covers."""


def scheme_labels(scheme: str, class_names) -> dict[str, int]:
    """class folder -> label under `scheme` for these classes; DataError naming any it cannot label."""
    if scheme not in CLASS_SCHEMES:
        raise DataError(f"unknown class scheme {scheme!r}; choose one of {sorted(CLASS_SCHEMES)}")
    labels = CLASS_SCHEMES[scheme]["labels"]
    unknown = [c for c in class_names if c not in labels]
    if unknown:
        raise DataError(f"class scheme {scheme!r} has no label for class(es) {unknown}; "
                        f"it covers {sorted(labels)}")
    return {c: labels[c] for c in class_names}


@dataclass(frozen=True)
class Record:
    """One image and its masks. `inf_mask` is None where the source has no infection annotation."""

    image: Path
    lung_mask: Path
    inf_mask: Optional[Path]
    label: int
    class_name: str
    subset: str
    split: str


@dataclass(frozen=True)
class BadInput:
    """A file or folder that cannot become a sample, with the reason."""

    path: str
    reason: str


@dataclass
class Listing:
    """What a reader found: usable records, bad inputs, and the class names per subset in label order."""

    records: list[Record]
    bad: list[BadInput]
    classes: dict[str, list[str]]
    label_map: dict[str, dict[str, int]]


def _pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def _subset_root(root: Path, top: str) -> Optional[Path]:
    """The folder holding Train/Val/Test: `top/top` as released, or a single `top`."""
    for cand in (root / top / top, root / top):
        if cand.is_dir() and any((cand / d).is_dir() for d in SPLIT_DIRS.values()):
            return cand
    return None


def list_covid_qu_ex(root: str | Path) -> Listing:
    """List both COVID-QU-Ex subsets under `root` (either may be absent, not both)."""
    root = Path(root)
    records: list[Record] = []
    bad: list[BadInput] = []
    found = {}
    for subset, top in SUBSET_DIRS.items():
        sub_root = _subset_root(root, top)
        if sub_root is not None:
            found[subset] = sub_root
    if not found:
        raise DataError(
            f"{root}: not a COVID-QU-Ex folder; expected '{SUBSET_DIRS['lung']}/{SUBSET_DIRS['lung']}/Train' "
            f"or '{SUBSET_DIRS['infection']}/{SUBSET_DIRS['infection']}/Train' under it")
    for subset, sub_root in found.items():
        for split, split_dir in SPLIT_DIRS.items():
            if not (sub_root / split_dir).is_dir():
                continue
            for class_name in CLASS_NAMES:
                folder = sub_root / split_dir / class_name
                if not (folder / "images").is_dir() or not _pngs(folder / "images"):
                    bad.append(BadInput(str(folder), "empty class folder (no images/*.png)"))
                    continue
                for image in _pngs(folder / "images"):
                    rec, why = _qu_ex_record(image, folder, subset, split, class_name)
                    if rec is None:
                        bad.append(BadInput(str(image), why))
                    else:
                        records.append(rec)
    classes = {s: list(CLASS_NAMES) for s in found}
    return Listing(records, bad, classes, {s: dict(QU_EX_LABELS) for s in found})


def _qu_ex_record(image: Path, folder: Path, subset: str, split: str,
                  class_name: str) -> tuple[Optional[Record], str]:
    lung = folder / "lung masks" / image.name
    if not lung.is_file():
        return None, f"image without a mask (missing {lung})"
    inf: Optional[Path] = None
    if subset == "infection":
        cand = folder / "infection masks" / image.name
        if cand.is_file():
            inf = cand
        elif class_name == "COVID-19":
            return None, f"image without a mask (missing {cand})"
    return Record(image, lung, inf, QU_EX_LABELS[class_name], class_name, subset, split), ""


def split_stratified(names: list[str], seed: int, class_index: int, val_fraction: float) -> set[str]:
    """The names (of one class) that go to val: a seeded permutation of the sorted names."""
    ordered = sorted(names)
    rng = np.random.default_rng([seed, class_index])
    n_val = int(round(len(ordered) * val_fraction))
    return {ordered[i] for i in rng.permutation(len(ordered))[:n_val]}


def list_radiography(root: str | Path, seed: int = 0, val_fraction: float = 0.2, classes: str = "covid3") -> Listing:
    """List the COVID-19 Radiography Database with a stratified train/val split (subset `lung`),
    labelled by the class scheme `classes` (covid3 or radiography4)."""
    root = Path(root)
    if not 0.0 <= val_fraction < 1.0:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    present = [c for c in RADIOGRAPHY_LABELS if (root / c).is_dir()]
    if not present:
        raise DataError(
            f"{root}: not a COVID-19 Radiography Database folder; expected class folders "
            f"{', '.join(repr(c + '/images') for c in RADIOGRAPHY_LABELS)} under it")
    labels = scheme_labels(classes, present)
    records: list[Record] = []
    bad: list[BadInput] = []
    for class_name in present:
        folder = root / class_name
        images = _pngs(folder / "images") if (folder / "images").is_dir() else []
        if not images:
            bad.append(BadInput(str(folder), "empty class folder (no images/*.png)"))
            continue
        val = split_stratified([p.name for p in images], seed,
                               list(RADIOGRAPHY_LABELS).index(class_name), val_fraction)
        for image in images:
            mask = folder / "masks" / image.name
            if not mask.is_file():
                bad.append(BadInput(str(image), f"image without a mask (missing {mask})"))
                continue
            split = "val" if image.name in val else "train"
            records.append(Record(image, mask, None, labels[class_name], class_name, "lung", split))
    return Listing(records, bad, {"lung": present}, {"lung": labels})


def list_source(layout: str, root: str | Path, seed: int = 0, val_fraction: float = 0.2,
                classes: str = "covid3") -> Listing:
    """Dispatch on the layout name (`covid-qu-ex` or `radiography`); `classes` is the label scheme."""
    if not Path(root).is_dir():
        raise DataError(f"input folder not found: {root}")
    if layout == "covid-qu-ex":
        if classes != "covid3":
            raise DataError(f"class scheme {classes!r} is for the Radiography DB; COVID-QU-Ex has the "
                            "covid3 classes only")
        return list_covid_qu_ex(root)
    if layout == "radiography":
        return list_radiography(root, seed, val_fraction, classes)
    raise DataError(f"unknown layout {layout!r}; choose covid-qu-ex or radiography")


def source_fingerprint(records: list[Record], root: Path) -> str:
    """A cheap fingerprint of the input files: relative path, size and mtime of every file used."""
    digest = hashlib.sha256()
    for rec in sorted(records, key=lambda r: str(r.image)):
        for p in (rec.image, rec.lung_mask, rec.inf_mask):
            if p is not None:
                st = p.stat()
                digest.update(f"{p.relative_to(root)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return digest.hexdigest()

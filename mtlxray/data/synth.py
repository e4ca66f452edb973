"""Synthetic phantom chest X-rays with exact masks, written in the COVID-QU-Ex on-disk layout.

Each image is a deterministic function of (seed, subset, split, class, index), so the output does
not depend on the number of worker processes. The classes are visible in the image:

- Normal: clear lungs.
- Non-COVID: a unilateral lobar consolidation or a pleural effusion.
- COVID-19: bilateral, peripheral, lower-zone ground-glass opacities; these are the infection mask.

`duplicates=N` then plants N known duplicates across splits, for testing the audit: a training
image (with its masks) replaces a val or test image of the same class, as an exact copy (the same
pixels, re-encoded) or a near copy (resized down and up, JPEG re-encoded, brightness changed, or
shifted by one pixel), alternately within a subset and from the infection subset into the lung
subset (COVID-QU-Ex's infection images come from the lung subset's pool). Counts stay as planned;
`duplicates.json` at the root lists every planted pair.
"""

from __future__ import annotations

import io
import logging
import multiprocessing as mp
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm import tqdm

from mtlxray import CLASS_NAMES
from mtlxray.data.sources import SPLIT_DIRS, SUBSET_DIRS
from mtlxray.errors import DataError
from mtlxray.io import atomic_path, write_json_atomic
from mtlxray.paper import SUBSET_COUNTS

__all__ = [
    "SCALE_COUNTS", "PhantomSpec", "plan", "file_name", "render_phantom",
    "synthesize", "plant_duplicates", "NEAR_TRANSFORMS",
]

log = logging.getLogger(__name__)

def _counts(lung: dict[str, tuple[int, int, int]], inf: dict[str, tuple[int, int, int]]) -> dict:
    return {
        subset: {split: {c: table[c][i] for c in CLASS_NAMES} for i, split in enumerate(SPLIT_DIRS)}
        for subset, table in (("lung", lung), ("infection", inf))
    }


SCALE_COUNTS: dict[str, dict[str, dict[str, dict[str, int]]]] = {
    "tiny": _counts({c: (6, 2, 2) for c in CLASS_NAMES},
                    {"Normal": (2, 1, 1), "Non-COVID": (2, 1, 1), "COVID-19": (4, 2, 2)}),
    "small": _counts({c: (60, 15, 15) for c in CLASS_NAMES},
                     {"Normal": (12, 4, 4), "Non-COVID": (12, 4, 4), "COVID-19": (24, 8, 8)}),
    "paper": SUBSET_COUNTS,
}
"""scale -> subset -> split -> class -> number of images (paper = Table I / Table II)."""


@dataclass(frozen=True)
class PhantomSpec:
    """One image to render: where it goes and what determines its pixels."""

    subset: str
    split: str
    class_name: str
    index: int

    @property
    def folder(self) -> Path:
        """Class folder relative to the output root, e.g. `Lung Segmentation Data/Lung .../Train/Normal`."""
        top = SUBSET_DIRS[self.subset]
        return Path(top) / top / SPLIT_DIRS[self.split] / self.class_name

    @property
    def name(self) -> str:
        return file_name(self.class_name, self.index)


def file_name(class_name: str, index: int) -> str:
    """Real-release style file name: `covid_989.png`, `non_COVID (3300).png`, `Normal (84).png`."""
    return {"COVID-19": f"covid_{index}.png", "Non-COVID": f"non_COVID ({index}).png",
            "Normal": f"Normal ({index}).png"}[class_name]


def plan(scale: str) -> list[PhantomSpec]:
    """Every image a scale writes, in a fixed order; indices run 1.. per (subset, class) across splits."""
    if scale not in SCALE_COUNTS:
        raise DataError(f"unknown synthetic scale {scale!r}; choose one of {sorted(SCALE_COUNTS)}")
    specs = []
    for subset, splits in SCALE_COUNTS[scale].items():
        for class_name in CLASS_NAMES:
            index = 1
            for split in SPLIT_DIRS:
                for _ in range(splits[split][class_name]):
                    specs.append(PhantomSpec(subset, split, class_name, index))
                    index += 1
    return specs


def _spec_rng(seed: int, spec: PhantomSpec) -> np.random.Generator:
    ids = (seed, list(SUBSET_DIRS).index(spec.subset), list(SPLIT_DIRS).index(spec.split),
           CLASS_NAMES.index(spec.class_name), spec.index)
    return np.random.default_rng(ids)


def _lung_field(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float,
                angle: float, p: float, wobble: float, phase: float) -> np.ndarray:
    """A rotated superellipse with a low-frequency boundary wobble -> bool mask."""
    # Evaluate only inside the circle that bounds the shape: pow and arctan2 dominate the cost.
    reach = np.hypot(a, b) * (1.0 + wobble)
    cols = np.flatnonzero(np.abs(u[0] - cx) <= reach)
    rows = np.flatnonzero(np.abs(v[:, 0] - cy) <= reach)
    out = np.zeros(u.shape, dtype=bool)
    if cols.size == 0 or rows.size == 0:
        return out
    win = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    c, s = np.cos(angle), np.sin(angle)
    du, dv = u[win] - cx, v[win] - cy
    x, y = du * c + dv * s, -du * s + dv * c
    r = (np.abs(x / a) ** p + np.abs(y / b) ** p) ** (1.0 / p)
    out[win] = r < 1.0 + wobble * np.sin(2 * np.arctan2(y, x) + phase)
    return out


def _ellipse(u: np.ndarray, v: np.ndarray, cx: float, cy: float, a: float, b: float) -> np.ndarray:
    return ((u - cx) / a) ** 2 + ((v - cy) / b) ** 2 < 1.0


def render_phantom(rng: np.random.Generator, class_name: str, size: int) -> tuple[np.ndarray, ...]:
    """Render one phantom -> (image uint8, lung mask bool, infection mask bool), each (size, size)."""
    g = np.linspace(-1.0, 1.0, size, dtype=np.float32)
    u, v = np.meshgrid(g, g)  # u: x to the right, v: y downwards
    img = np.full((size, size), 0.04, np.float32)
    body = _ellipse(u, v, rng.uniform(-0.03, 0.03), 0.08, rng.uniform(0.82, 0.92), 1.05)
    img[body] = 0.55

    # Two lung fields; the patient's right lung is on the image's left.
    dy, sc = rng.uniform(-0.06, 0.06), rng.uniform(0.9, 1.08)
    lungs = []
    for side in (-1, 1):
        lung = _lung_field(
            u, v, cx=side * rng.uniform(0.36, 0.42), cy=-0.02 + dy + rng.uniform(-0.03, 0.03),
            a=0.23 * sc * rng.uniform(0.9, 1.1), b=0.55 * sc * rng.uniform(0.9, 1.05),
            angle=side * np.deg2rad(rng.uniform(-4, 10)), p=rng.uniform(2.0, 3.0),
            wobble=rng.uniform(0.0, 0.06), phase=rng.uniform(0, 2 * np.pi))
        lungs.append(lung & body)
    heart = _ellipse(u, v, rng.uniform(0.08, 0.16), 0.32 + dy, rng.uniform(0.26, 0.32), rng.uniform(0.2, 0.26))
    lungs[1] &= ~heart  # the cardiac notch of the left lung
    lung = lungs[0] | lungs[1]
    img[lung] = 0.2
    mediastinum = body & ~lung & (np.abs(u) < 0.1 + 0.04 * (v > 0))
    img[mediastinum] = 0.78
    img[heart & body & ~lung] = 0.72

    # Ribs: curved bright bands across the thorax, over the lungs.
    ribs = np.zeros_like(img)
    for k in range(9):
        y0 = -0.62 + 0.15 * k + dy + rng.uniform(-0.02, 0.02)
        band = np.abs(v - (y0 + 0.35 * u ** 2)) < 0.025
        ribs[band & (np.abs(u) > 0.08) & (np.abs(u) < 0.8)] = 0.12
    img += ribs * body

    inf = np.zeros_like(lung)
    if class_name == "COVID-19":
        for side_lung in lungs:
            ys, xs = np.nonzero(side_lung)
            lx = g[xs]
            ly0, ly1 = g[ys].min(), g[ys].max()
            lateral = lx.min() if lx.mean() < 0 else lx.max()
            for _ in range(int(rng.integers(2, 4))):
                cx = lateral - np.sign(lateral) * rng.uniform(0.02, 0.1)
                cy = ly0 + (ly1 - ly0) * rng.uniform(0.55, 0.85)
                inf |= _ellipse(u, v, cx, cy, rng.uniform(0.07, 0.13), rng.uniform(0.07, 0.14))
        inf &= lung
        img[inf] += 0.22 + 0.04 * rng.standard_normal(int(inf.sum())).astype(np.float32)
    elif class_name == "Non-COVID":
        side_lung = lungs[int(rng.integers(0, 2))]
        ys = np.nonzero(side_lung)[0]
        ly0, ly1 = g[ys].min(), g[ys].max()
        if rng.random() < 0.5:  # lobar consolidation: a dense upper or lower lobe
            cut = ly0 + (ly1 - ly0) * rng.uniform(0.35, 0.55)
            slope = rng.uniform(-0.4, 0.4)
            lobe = (v < cut + slope * u) if rng.random() < 0.5 else (v > cut + slope * u)
            region = side_lung & lobe
            img[region] = 0.5 + 0.05 * rng.standard_normal(int(region.sum())).astype(np.float32)
        else:  # effusion: homogeneous fluid at the base with a meniscus
            level = ly1 - (ly1 - ly0) * rng.uniform(0.2, 0.4)
            ux = g[np.nonzero(side_lung)[1]].mean()
            region = side_lung & (v > level - 0.3 * np.abs(u - ux))
            img[region] = 0.62

    img += rng.normal(0.0, 0.025, img.shape).astype(np.float32)
    return np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8), lung, inf


def _write_png(path: Path, array: np.ndarray, compress_level: int = 6) -> None:
    with atomic_path(path) as tmp:
        Image.fromarray(array, mode="L").save(tmp, format="PNG", compress_level=compress_level)


def _render_and_write(job: tuple[str, int, int, PhantomSpec]) -> None:
    root, seed, size, spec = job
    img, lung, inf = render_phantom(_spec_rng(seed, spec), spec.class_name, size)
    folder = Path(root) / spec.folder
    _write_png(folder / "images" / spec.name, img)
    _write_png(folder / "lung masks" / spec.name, lung.astype(np.uint8) * 255)
    if spec.subset == "infection":
        _write_png(folder / "infection masks" / spec.name, inf.astype(np.uint8) * 255)


NEAR_TRANSFORMS = ("resize", "jpeg", "brightness", "shift")
"""How planted near duplicates differ from their source, in the order they are used."""


def _near_copy(img: np.ndarray, masks: list[np.ndarray], how: str) -> tuple[np.ndarray, list[np.ndarray]]:
    """A near copy of an image (and its 0/255 masks, moved alike where the geometry changes)."""
    h, w = img.shape
    if how == "resize":  # a lower-resolution copy brought back to the original size
        small = (max(8, int(w * 0.75)), max(8, int(h * 0.75)))
        img = np.asarray(Image.fromarray(img).resize(small, Image.Resampling.BILINEAR)
                         .resize((w, h), Image.Resampling.BILINEAR))
        masks = [np.asarray(Image.fromarray(m).resize(small, Image.Resampling.NEAREST)
                            .resize((w, h), Image.Resampling.NEAREST)) for m in masks]
    elif how == "jpeg":
        buf = io.BytesIO()
        Image.fromarray(img).save(buf, format="JPEG", quality=75)
        img = np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("L"))
    elif how == "brightness":
        img = np.clip(img.astype(np.float32) * 1.08 + 6.0, 0, 255).astype(np.uint8)
    elif how == "shift":  # one pixel right and down, edges repeated
        img = ndimage.shift(img, (1, 1), order=0, mode="nearest")
        masks = [ndimage.shift(m, (1, 1), order=0, mode="constant", cval=0) for m in masks]
    else:
        raise ValueError(how)
    return np.ascontiguousarray(img, dtype=np.uint8), [np.ascontiguousarray(m, dtype=np.uint8) for m in masks]


def _read_png(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        return np.asarray(im.convert("L"), dtype=np.uint8)


def plant_duplicates(root: str | Path, scale: str, n: int, seed: int = 0) -> list[dict]:
    """Replace n val/test images of a synthesised tree by copies of training images (see the module
    docstring) and write `duplicates.json`; returns its pairs ({kind, transform, source, copy}:
    paths relative to `root`)."""
    root = Path(root)
    specs = plan(scale)
    rng = np.random.default_rng([seed, 7919, n])
    train = [s for s in specs if s.split == "train"]
    evals = [s for s in specs if s.split != "train"]
    order_t, order_e = rng.permutation(len(train)), rng.permutation(len(evals))
    used_src, used_dst = set(), set()
    pairs = []
    for k in range(n):
        kind = "exact" if k % 2 == 0 else "near"
        cross = (k // 2) % 2 == 1  # infection train -> lung val/test, else within one subset
        pick = None
        for i in order_e:
            dst = evals[i]
            if i in used_dst or (cross and dst.subset != "lung"):
                continue
            src_subset = "infection" if cross else dst.subset
            for j in order_t:
                src = train[j]
                if j not in used_src and src.subset == src_subset and src.class_name == dst.class_name:
                    pick = (i, j)
                    break
            if pick:
                break
        if pick is None:
            raise DataError(f"scale {scale!r} has room for fewer than {n} planted duplicates; "
                            f"{k} planted (use a larger scale or fewer)")
        used_dst.add(pick[0])
        used_src.add(pick[1])
        dst, src = evals[pick[0]], train[pick[1]]
        mask_dirs = ["lung masks"] + (["infection masks"] if dst.subset == "infection" else [])
        img = _read_png(root / src.folder / "images" / src.name)
        masks = [_read_png(root / src.folder / d / src.name) for d in mask_dirs]
        transform = ""
        if kind == "near":
            transform = NEAR_TRANSFORMS[(k // 2) % len(NEAR_TRANSFORMS)]
            img, masks = _near_copy(img, masks, transform)
        # An exact copy is the same pixels in another file (another compression level: other bytes).
        _write_png(root / dst.folder / "images" / dst.name, img, compress_level=1)
        for d, m in zip(mask_dirs, masks):
            _write_png(root / dst.folder / d / dst.name, m, compress_level=1)
        pairs.append({"kind": kind, "transform": transform,
                      "source": str(src.folder / "images" / src.name), "copy": str(dst.folder / "images" / dst.name)})
    write_json_atomic(root / "duplicates.json", pairs, indent=1)
    return pairs


def synthesize(output: str | Path, scale: str = "small", seed: int = 0, size: int = 256,
               workers: int = 0, progress: bool = True, duplicates: int = 0) -> dict:
    """Write a phantom tree under `output`; returns SCALE_COUNTS[scale] (what was written). With
    `duplicates`, plant that many known duplicates across splits (`plant_duplicates`)."""
    if size < 32:
        raise DataError(f"synthetic image size must be >= 32, got {size}")
    if duplicates < 0:
        raise DataError(f"--duplicates must be >= 0, got {duplicates}")
    specs = plan(scale)
    root = Path(output)
    for spec in specs:
        for sub in ("images", "lung masks") + (("infection masks",) if spec.subset == "infection" else ()):
            (root / spec.folder / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(str(root), seed, size, spec) for spec in specs]
    workers = workers or os.cpu_count() or 1
    bar = tqdm(total=len(jobs), desc="synth", unit="img", disable=not progress)
    if workers == 1:
        for job in jobs:
            _render_and_write(job)
            bar.update()
    else:
        with mp.get_context("fork").Pool(workers) as pool:
            for _ in pool.imap_unordered(_render_and_write, jobs, chunksize=8):
                bar.update()
    bar.close()
    log.info("wrote %d synthetic images (scale %s, seed %d) under %s", len(jobs), scale, seed, root)
    if duplicates:
        plant_duplicates(root, scale, duplicates, seed)
        log.info("planted %d duplicates across splits (listed in %s)", duplicates, root / "duplicates.json")
    else:
        (root / "duplicates.json").unlink(missing_ok=True)
    return SCALE_COUNTS[scale]

"""Duplicate and leakage audit of shard sets, from the image hashes `shards build` records.

Every manifest built by this version holds an image table (`manifest["images"]`: `columns` and one
row per sample) with two hashes of the decoded source image, before any resizing:

- `content`: the first 128 bits of the sha256 of the decoded pixels (and their shape). Equal for
  exact duplicates, whatever the file name or the PNG/JPEG encoding.
- `phash`: a 256-bit perceptual hash (DCT sign hash of a 64² thumbnail centred on its intensity
  centroid). Close in Hamming distance for near duplicates: resized, re-encoded (JPEG), brightness or
  contrast changed, shifted by a pixel or two.

Why not `imagehash.phash`: on the synthetic phantoms (images from one template, as chest X-rays are)
its 64-bit hash gave *distinct* images a distance of 0, and its 256-bit hash put a 1-pixel shift
(distance 26) beyond the closest distinct pair (18). Centring on the intensity centroid first brings
a 1-pixel shift to ≤ 10 and a 2-pixel one to ≤ 20 with distinct images at ≥ 20 (figures from the
benchmark in tests/data/test_audit.py). `NEAR_THRESHOLD` is the default cut.

A pair is *leakage* when its two images sit in different splits (train/val/test), whichever shard
sets or subsets they come from; duplicates within one split are reported but are not leakage.

Python API (the evaluation's leakage check uses `overlap`):

    overlap(eval_shards, "test", train_shards, "train", subset_a=None, subset_b=None) -> list[Pair]
    audit([root, ...], out_dir) -> AuditResult      # what `mtlxray shards audit` runs
    find_pairs(images_a, images_b=None) -> list[Pair]
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from scipy import fft, ndimage

from mtlxray.errors import ShardError
from mtlxray.io import atomic_path

__all__ = ["NEAR_THRESHOLD", "IMAGE_COLUMNS", "ImageRef", "Pair", "AuditResult", "content_hash",
           "perceptual_hash", "hamming", "manifest_images", "find_pairs", "duplicate_groups", "overlap",
           "audit", "format_audit", "contact_sheet", "cli_audit", "EXIT_LEAKAGE"]

log = logging.getLogger(__name__)

NEAR_THRESHOLD = 16
"""Largest Hamming distance (of 255 bits) between the perceptual hashes of a near-duplicate pair."""
IMAGE_COLUMNS = ["key", "subset", "split", "class_name", "shard", "source", "content", "phash"]
"""Columns of a manifest's image table, in order."""
EXIT_LEAKAGE = 3
_THUMB = 64
_HASH = 16  # a 16x16 block of DCT coefficients, DC left out: 255 bits (plus one zero pad bit)
_SPLIT_ORDER = {"test": 0, "val": 1, "train": 2}


def content_hash(pixels: np.ndarray) -> str:
    """32 hex digits identifying the decoded pixels exactly (shape included)."""
    arr = np.ascontiguousarray(pixels, dtype=np.uint8)
    digest = hashlib.sha256(f"{arr.shape[0]}x{arr.shape[1]}:".encode())
    digest.update(arr.tobytes())
    return digest.hexdigest()[:32]


def perceptual_hash(pixels: np.ndarray) -> str:
    """64 hex digits: sign bits (against their median) of the 255 lowest DCT coefficients of a 64²
    thumbnail that was shifted so its intensity centroid sits at the centre."""
    thumb = np.asarray(Image.fromarray(np.asarray(pixels, dtype=np.uint8)).resize(
        (_THUMB, _THUMB), Image.Resampling.BOX), dtype=np.float64)
    mass = thumb - thumb.min()
    if mass.sum() > 0:
        cy, cx = ndimage.center_of_mass(mass)
        c = (_THUMB - 1) / 2.0
        thumb = ndimage.shift(thumb, (c - cy, c - cx), order=1, mode="nearest")
    coeffs = fft.dctn(thumb, norm="ortho")[:_HASH, :_HASH].ravel()[1:]
    bits = np.append(coeffs > np.median(coeffs), False)
    return np.packbits(bits).tobytes().hex()


def _words(hexes: Sequence[str]) -> np.ndarray:
    """Perceptual hashes -> (N, 4) uint64."""
    if not hexes:
        return np.zeros((0, 4), np.uint64)
    return np.frombuffer(bytes.fromhex("".join(hexes)), dtype=">u8").astype(np.uint64).reshape(-1, 4)


def hamming(a: str, b: str) -> int:
    """Bits that differ between two perceptual hashes."""
    return int(np.bitwise_count(_words([a]) ^ _words([b])).sum())


@dataclass(frozen=True)
class ImageRef:
    """One image of a shard set, as its manifest's image table lists it."""

    set: str
    subset: str
    split: str
    class_name: str
    key: str
    shard: str
    source: str
    content: str
    phash: str


@dataclass(frozen=True)
class Pair:
    """Two images that are the same picture: `exact` (same pixels) or `near` (hash distance)."""

    kind: str
    distance: int
    a: ImageRef
    b: ImageRef

    @property
    def leakage(self) -> bool:
        return self.a.split != self.b.split

    @property
    def label_conflict(self) -> bool:
        return self.a.class_name != self.b.class_name


def _read(root_or_manifest) -> tuple[str, dict]:
    from mtlxray.data.loader import read_manifest
    from mtlxray.data.remote import normalise_root

    if isinstance(root_or_manifest, dict):
        return str(root_or_manifest.get("source", {}).get("root", "<manifest>")), root_or_manifest
    root = normalise_root(root_or_manifest)
    return root, read_manifest(root)


def manifest_images(manifest: dict, name: str = "") -> list[ImageRef]:
    """The image table of a manifest; ShardError if it was built without one."""
    table = manifest.get("images")
    if not isinstance(table, dict) or table.get("columns") != IMAGE_COLUMNS:
        raise ShardError(f"{name or 'manifest'}: the manifest has no image hashes (built by an older "
                         "mtlxray); rebuild the shards to audit them")
    return [_ref(name, row) for row in table["rows"]]


def _ref(name: str, row: Sequence[str]) -> ImageRef:
    """An image-table row (`IMAGE_COLUMNS` order) of shard set `name`."""
    return ImageRef(set=name, **dict(zip(IMAGE_COLUMNS, row)))


def _near(ha: np.ndarray, hb: np.ndarray, threshold: int, same: bool, chunk: int = 1024) -> Iterable[tuple[int, int, int]]:
    """(i, j, distance) with distance <= threshold; j > i when `same` (ha is hb)."""
    for start in range(0, len(ha), chunk):
        block = ha[start:start + chunk]
        dist = np.zeros((len(block), len(hb)), np.uint16)
        for w in range(4):
            dist += np.bitwise_count(block[:, w, None] ^ hb[None, :, w])
        if same:
            dist[np.arange(len(block))[:, None] >= np.arange(len(hb))[None, :] - start] = 0xFFFF
        for i, j in zip(*np.nonzero(dist <= threshold)):
            yield start + int(i), int(j), int(dist[i, j])


def _sort_key(p: Pair) -> tuple:
    return (not p.leakage, p.kind != "exact", p.distance, p.a.set, p.a.key, p.b.set, p.b.key)


def find_pairs(images_a: Sequence[ImageRef], images_b: Optional[Sequence[ImageRef]] = None,
               threshold: int = NEAR_THRESHOLD) -> list[Pair]:
    """Exact and near duplicate pairs within `images_a`, or between `images_a` and `images_b`;
    leakage first, then exact, then by distance."""
    same = images_b is None
    images_b = images_a if same else images_b
    ha, hb = _words([x.phash for x in images_a]), _words([x.phash for x in images_b])
    pairs = {}
    for i, j, d in _near(ha, hb, threshold, same):
        a, b = images_a[i], images_b[j]
        pairs[(i, j)] = Pair("exact" if a.content == b.content else "near", d, a, b)
    # Exact duplicates whatever their hash distance (a hash tie-break cannot separate equal pixels,
    # but be exact about exact).
    by_content: dict[str, list[int]] = {}
    for j, x in enumerate(images_b):
        by_content.setdefault(x.content, []).append(j)
    for i, a in enumerate(images_a):
        for j in by_content.get(a.content, ()):
            if (same and j <= i) or (i, j) in pairs:
                continue
            pairs[(i, j)] = Pair("exact", hamming(a.phash, images_b[j].phash), a, images_b[j])
    return sorted(pairs.values(), key=_sort_key)


def duplicate_groups(images: Sequence[ImageRef], threshold: int = NEAR_THRESHOLD) -> list[list[int]]:
    """Indices of images that are copies of one another (connected through exact or near pairs),
    groups of two or more only."""
    parent = list(range(len(images)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    index = {id(x): i for i, x in enumerate(images)}
    for p in find_pairs(images, threshold=threshold):
        ra, rb = find(index[id(p.a)]), find(index[id(p.b)])
        if ra != rb:
            parent[max(ra, rb)] = min(ra, rb)
    groups: dict[int, list[int]] = {}
    for i in range(len(images)):
        groups.setdefault(find(i), []).append(i)
    return [g for g in groups.values() if len(g) > 1]


def overlap(a, split_a: str, b, split_b: str, *, subset_a: Optional[str] = None, subset_b: Optional[str] = None,
            threshold: int = NEAR_THRESHOLD) -> list[Pair]:
    """Pairs of (near) identical images between split `split_a` of shard set `a` and split `split_b`
    of shard set `b` (each a shard root, URL or manifest dict; subsets optional).

    For evaluation: `overlap(eval_shards, "test", train_shards, "train")` is empty when no test image
    appears in the training data. ShardError when a manifest has no image table (an older build).
    """
    name_a, ma = _read(a)
    name_b, mb = _read(b)
    ia = [x for x in manifest_images(ma, name_a) if x.split == split_a and subset_a in (None, x.subset)]
    ib = [x for x in manifest_images(mb, name_b) if x.split == split_b and subset_b in (None, x.subset)]
    return find_pairs(ia, ib, threshold)


# ---------------------------------------------------------------------------------------------
# The audit command


@dataclass
class AuditResult:
    """What `audit` found and wrote."""

    images: dict[str, int]
    pairs: list[Pair]
    threshold: int
    csv: Optional[Path] = None
    sheet: Optional[Path] = None
    notes: list[str] = field(default_factory=list)

    @property
    def leakage(self) -> list[Pair]:
        return [p for p in self.pairs if p.leakage]


def _pixels_of(refs: Iterable[ImageRef], roots: dict[str, str], manifests: dict[str, dict]) -> dict[tuple[str, str], np.ndarray]:
    """The stored images of `refs`, read from their shards (local or remote), one pass per shard."""
    from mtlxray.data.loader import decode_image, shard_location
    from mtlxray.data.tarstream import tar_samples

    wanted: dict[tuple[str, str], set[str]] = {}
    for r in refs:
        wanted.setdefault((r.set, r.shard), set()).add(r.key)
    out = {}
    for (name, shard), keys in wanted.items():
        m = manifests[name]
        url = shard_location(roots[name], shard)
        for sample in tar_samples([{"url": url}]):
            if sample["__key__"] in keys:
                out[(name, sample["__key__"])] = decode_image(sample, "img", m["format"], m["image_size"])
                keys.discard(sample["__key__"])
                if not keys:
                    break
    return out


def contact_sheet(pairs: Sequence[Pair], roots: dict[str, str], manifests: dict[str, dict], path: Path,
                  thumb: int = 192) -> Path:
    """A PNG with one row per pair, the two images side by side and a caption under each."""
    pixels = _pixels_of([r for p in pairs for r in (p.a, p.b)], roots, manifests)
    caption = 30
    gap = 8
    sheet = Image.new("L", (2 * thumb + 3 * gap, len(pairs) * (thumb + caption + gap) + gap), 255)
    draw = ImageDraw.Draw(sheet)
    for row, p in enumerate(pairs):
        y = gap + row * (thumb + caption + gap)
        for col, ref in enumerate((p.a, p.b)):
            x = gap + col * (thumb + gap)
            arr = pixels.get((ref.set, ref.key))
            if arr is not None:
                sheet.paste(Image.fromarray(arr).resize((thumb, thumb), Image.Resampling.BILINEAR), (x, y))
            label = f"{Path(ref.set).name}:{ref.subset}/{ref.split}"
            draw.text((x, y + thumb + 2), label[:38], fill=0)
            draw.text((x, y + thumb + 15), ref.key[-38:], fill=0)
        tag = f"{p.kind} d={p.distance}" + (" LEAK" if p.leakage else "")
        draw.rectangle((gap, y, gap + 6 * len(tag) + 4, y + 12), fill=0)
        draw.text((gap + 2, y + 1), tag, fill=255)
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def _write_csv(pairs: Sequence[Pair], path: Path) -> Path:
    cols = ["set", "subset", "split", "class_name", "key", "shard", "source"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["kind", "distance", "leakage", "label_conflict"] + [f"{c}_a" for c in cols]
                    + [f"{c}_b" for c in cols])
    for p in pairs:
        writer.writerow([p.kind, p.distance, int(p.leakage), int(p.label_conflict)]
                        + [getattr(p.a, c) for c in cols] + [getattr(p.b, c) for c in cols])
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())
    return path


def audit(roots: Sequence[str | Path], out: Optional[str | Path] = None, *, threshold: int = NEAR_THRESHOLD,
          sheet_pairs: int = 24) -> AuditResult:
    """Find exact and near duplicates across every subset and split of the given shard sets; with
    `out`, write `audit.csv` (every pair) and `contact_sheet.png` (the first `sheet_pairs` pairs)."""
    names: dict[str, str] = {}
    manifests: dict[str, dict] = {}
    images: list[ImageRef] = []
    counts: dict[str, int] = {}
    for root in roots:
        name, manifest = _read(root)
        if name in manifests:
            continue
        names[name], manifests[name] = name, manifest
        rows = manifest_images(manifest, name)
        counts[name] = len(rows)
        images += rows
    pairs = find_pairs(images, threshold=threshold)
    result = AuditResult(counts, pairs, threshold)
    if out is not None:
        out = Path(out)
        result.csv = _write_csv(pairs, out / "audit.csv")
        if pairs and sheet_pairs > 0:
            result.sheet = contact_sheet(pairs[:sheet_pairs], names, manifests, out / "contact_sheet.png")
    return result


def format_audit(result: AuditResult, show: int = 20) -> str:
    lines = [f"{n:,} images in {name}" for name, n in result.images.items()]
    kinds: dict[tuple[str, str], int] = {}
    for p in result.pairs:
        boundary = "-".join(sorted({p.a.split, p.b.split}, key=lambda s: _SPLIT_ORDER.get(s, 9)))
        kinds[(p.kind, boundary)] = kinds.get((p.kind, boundary), 0) + 1
    lines.append(f"near-duplicate threshold: Hamming distance <= {result.threshold} of 255 bits")
    lines.append(f"{'pairs':<8}{'splits':<14}{'count':>7}  leakage")
    for (kind, boundary), n in sorted(kinds.items()):
        lines.append(f"{kind:<8}{boundary:<14}{n:>7}  {'yes' if '-' in boundary else 'no'}")
    if not kinds:
        lines.append("(no duplicates)")
    if result.pairs:
        lines.append("")
        lines.append(f"{'kind':<6} {'dist':>4}  {'leak':<4}  image a  <->  image b")
        for p in result.pairs[:show]:
            a = f"{Path(p.a.set).name}:{p.a.subset}/{p.a.split}/{p.a.key}"
            b = f"{Path(p.b.set).name}:{p.b.subset}/{p.b.split}/{p.b.key}"
            lines.append(f"{p.kind:<6} {p.distance:>4}  {'yes' if p.leakage else 'no':<4}  {a}  <->  {b}")
        if len(result.pairs) > show:
            lines.append(f"... {len(result.pairs) - show} more in audit.csv")
    leak = result.leakage
    lines.append("")
    lines.append(f"LEAKAGE: {len(leak)} pair(s) cross a train/val/test boundary" if leak
                 else "clean: no image crosses a train/val/test boundary")
    if result.csv is not None:
        lines.append(f"wrote {result.csv}" + (f" and {result.sheet}" if result.sheet else ""))
    return "\n".join(lines) + "\n"


def cli_audit(args: argparse.Namespace) -> int:
    from mtlxray.data.shards import write_stdout

    result = audit(args.shards, args.out, threshold=args.threshold, sheet_pairs=args.sheet_pairs)
    write_stdout(format_audit(result))
    if result.leakage:
        print(f"mtlxray shards audit: {len(result.leakage)} leakage pair(s); see {result.csv}", file=sys.stderr)
        return EXIT_LEAKAGE
    return 0

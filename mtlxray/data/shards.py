"""Pack a dataset folder into WebDataset tar shards plus manifest.json.

Output: `OUTPUT/<subset>/<split>-NNNNNN.tar` and `OUTPUT/manifest.json`. Every tar is byte-for-byte
deterministic (fixed member order, mtime, owner and mode), written under a temporary name and
renamed; the manifest is written last, so a shard set without a manifest is never read. A re-run
whose inputs and parameters match the manifest is a no-op.

Sample members (`<key>.<field>`): `img`, `lung`, `inf` as `.png` or `.raw` (uint8, side x side;
masks 0/1, `inf` all zero where there is no annotation), `cls.json` and `box.json`.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from mtlxray import CLASS_NAMES
from mtlxray.data.boxes import bounding_boxes
from mtlxray.data.sources import Record, list_source, source_fingerprint
from mtlxray.errors import DataError

__all__ = ["BUILDER_VERSION", "IMAGE_SIZE", "build_shards", "sample_key", "format_tables", "cli_build",
           "cli_info"]

log = logging.getLogger(__name__)

BUILDER_VERSION = 1
IMAGE_SIZE = 256
_MTIME = 0  # fixed member mtime: identical inputs give identical tar bytes


class _Bad(Exception):
    """A sample that cannot be written; carries the reason."""


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


def sample_key(rec: Record) -> str:
    """`__key__` for a record: subset, split, class and file stem, with no dots or spaces."""
    return "_".join(_sanitise(s) for s in (rec.subset, rec.split, rec.class_name, Path(rec.image.name).stem))


def _open_gray(path: Path, what: str) -> tuple[np.ndarray, Optional[str]]:
    """Read a PNG as uint8 grayscale -> (array, note if it had to be converted)."""
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode == "L":
                return np.asarray(im, dtype=np.uint8).copy(), None
            if mode in ("I;16", "I;16B", "I"):
                arr = np.asarray(im, dtype=np.float64)
                top = arr.max() or 1.0
                return np.round(arr / top * 255).astype(np.uint8), f"{what}: {mode} image rescaled to 8 bit"
            return np.asarray(im.convert("L"), dtype=np.uint8).copy(), f"{what}: {mode} image converted to grayscale"
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as e:
        raise _Bad(f"corrupt or unreadable PNG ({what}): {e}") from None


def _binary_mask(arr: np.ndarray, what: str) -> np.ndarray:
    values = set(np.unique(arr).tolist())
    if values <= {0, 1}:
        return arr.astype(np.uint8)
    if values <= {0, 255}:
        return (arr // 255).astype(np.uint8)
    shown = sorted(values)[:6]
    raise _Bad(f"{what} values {shown}{'...' if len(values) > 6 else ''} are not in {{0,1}} or {{0,255}}")


def _load_mask(path: Path, shape: tuple[int, int], what: str, rescale: bool,
               notes: list[str]) -> np.ndarray:
    arr, note = _open_gray(path, what)
    if note:
        notes.append(note)
    mask = _binary_mask(arr, what)
    if mask.shape != shape:
        # The Radiography DB ships 256^2 masks for 299^2 images: same aspect, so resize it.
        same_aspect = mask.shape[0] * shape[1] == mask.shape[1] * shape[0]
        if not (rescale and same_aspect):
            raise _Bad(f"{what} size {mask.shape[1]}x{mask.shape[0]} differs from image {shape[1]}x{shape[0]}")
    return mask


def _resize(arr: np.ndarray, size: int, nearest: bool) -> np.ndarray:
    if arr.shape == (size, size):
        return arr
    resample = Image.Resampling.NEAREST if nearest else Image.Resampling.BILINEAR
    return np.asarray(Image.fromarray(arr).resize((size, size), resample), dtype=np.uint8)


def _encode(arr: np.ndarray, fmt: str) -> bytes:
    if fmt == "raw":
        return np.ascontiguousarray(arr, dtype=np.uint8).tobytes()
    buf = io.BytesIO()
    Image.fromarray(arr, mode="L").save(buf, format="PNG")
    return buf.getvalue()


def _make_sample(key: str, rec: Record, root: Path, fmt: str, size: int, rescale_masks: bool,
                 notes: list[str]) -> dict:
    img, note = _open_gray(rec.image, "image")
    if note:
        notes.append(note)
    lung = _load_mask(rec.lung_mask, img.shape, "lung mask", rescale_masks, notes)
    if rec.inf_mask is not None:
        inf = _load_mask(rec.inf_mask, img.shape, "infection mask", rescale_masks, notes)
    else:
        inf = np.zeros_like(img)
    img, lung, inf = _resize(img, size, False), _resize(lung, size, True), _resize(inf, size, True)
    meta = {"label": rec.label, "class_name": rec.class_name, "source_path": str(rec.image.relative_to(root)),
            "subset": rec.subset, "split": rec.split}
    return {"__key__": key, f"img.{fmt}": _encode(img, fmt), f"lung.{fmt}": _encode(lung, fmt),
            f"inf.{fmt}": _encode(inf, fmt), "cls.json": json.dumps(meta, sort_keys=True).encode(),
            "box.json": json.dumps(bounding_boxes(inf)).encode()}


@dataclass(frozen=True)
class _ShardJob:
    root: str
    out_dir: str
    rel_path: str
    items: tuple[tuple[str, Record], ...]
    fmt: str
    size: int
    rescale_masks: bool


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _write_shard(job: _ShardJob) -> dict:
    """Write one shard under a temporary name; returns its stats, bad inputs and notes."""
    root, final = Path(job.root), Path(job.out_dir) / job.rel_path
    tmp = final.with_name(f".{final.name}.tmp")
    bad: list[dict] = []
    notes: list[dict] = []
    counts: dict[str, int] = {}
    samples = 0
    with open(tmp, "wb") as f, wds.TarWriter(f, encoder=False, mtime=_MTIME, user="mtlxray",
                                             group="mtlxray", mode=0o444) as writer:
        for key, rec in job.items:
            sample_notes: list[str] = []
            try:
                sample = _make_sample(key, rec, root, job.fmt, job.size, job.rescale_masks, sample_notes)
            except _Bad as e:
                bad.append({"path": str(rec.image), "reason": str(e)})
                continue
            notes.extend({"path": str(rec.image), "note": n} for n in sample_notes)
            writer.write(sample)
            samples += 1
            counts[rec.class_name] = counts.get(rec.class_name, 0) + 1
    return {"tmp": str(tmp), "path": job.rel_path, "samples": samples, "bytes": tmp.stat().st_size,
            "sha256": _sha256(tmp), "bad": bad, "notes": notes, "counts": counts,
            "considered": len(job.items)}


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _plan_jobs(records: list[Record], root: Path, out: Path, fmt: str, shard_size: int, size: int,
               seed: int, rescale_masks: bool) -> list[_ShardJob]:
    keyed: dict[str, Record] = {}
    for rec in records:
        key = sample_key(rec)
        if key in keyed:  # sanitising can merge names; keep keys unique and stable
            key = f"{key}_{hashlib.sha256(str(rec.image).encode()).hexdigest()[:8]}"
        keyed[key] = rec
    groups: dict[tuple[str, str], list[tuple[str, Record]]] = {}
    for key in sorted(keyed):
        rec = keyed[key]
        groups.setdefault((rec.subset, rec.split), []).append((key, rec))
    jobs = []
    for (subset, split), items in sorted(groups.items()):
        # Mix classes across shards (sources list them class by class), reproducibly.
        order = np.random.default_rng([seed, len(items)]).permutation(len(items))
        items = [items[i] for i in order]
        for n, start in enumerate(range(0, len(items), shard_size)):
            jobs.append(_ShardJob(str(root), str(out), f"{subset}/{split}-{n:06d}.tar",
                                  tuple(items[start:start + shard_size]), fmt, size, rescale_masks))
    return jobs


def _up_to_date(out: Path, params: dict, fingerprint: str) -> Optional[dict]:
    path = out / "manifest.json"
    if not path.is_file():
        return None
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if old.get("params") != params or old.get("source", {}).get("fingerprint") != fingerprint:
        return None
    for shards in old.get("shards", {}).values():
        for entries in shards.values():
            for e in entries:
                p = out / e["path"]
                if not p.is_file() or p.stat().st_size != e["bytes"]:
                    return None
    return old


def _run_jobs(jobs: list[_ShardJob], workers: int, progress: bool) -> list[dict]:
    total = sum(len(j.items) for j in jobs)
    results = []
    with tqdm(total=total, desc="shards", unit="img", disable=not progress) as bar:
        if workers <= 1 or len(jobs) == 1:
            for job in jobs:
                results.append(_write_shard(job))
                bar.update(len(job.items))
        else:
            with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                for res in pool.imap(_write_shard, jobs):
                    results.append(res)
                    bar.update(res["considered"])
    return results


def _fail_on_bad(bad: list[dict], tmps: list[str]) -> None:
    for b in bad[:20]:
        log.error("bad input %s: %s", b["path"], b["reason"])
    for t in tmps:
        Path(t).unlink(missing_ok=True)
    first = bad[0]
    raise DataError(f"{first['path']}: {first['reason']} ({len(bad)} bad input(s) in all; "
                    "--skip-bad skips them and lists them in skipped.jsonl)")


def build_shards(input: str | Path, output: str | Path, *, layout: str = "covid-qu-ex", format: str = "png",
                 shard_size: int = 1000, workers: int = 0, skip_bad: bool = False, seed: int = 0,
                 val_fraction: float = 0.2, image_size: int = IMAGE_SIZE, progress: bool = True) -> dict:
    """Build the shard set and return the manifest (unchanged and unwritten when already up to date)."""
    if format not in ("png", "raw"):
        raise DataError(f"unknown shard format {format!r}; choose png or raw")
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    root, out = Path(input).resolve(), Path(output)
    listing = list_source(layout, root, seed, val_fraction)
    bad = [asdict(b) for b in listing.bad]
    if bad and not skip_bad:
        _fail_on_bad(bad, [])
    if not listing.records:
        raise DataError(f"{root}: no images found in the {layout} layout")
    params = {"layout": layout, "format": format, "shard_size": shard_size, "seed": seed,
              "val_fraction": val_fraction, "image_size": image_size, "skip_bad": skip_bad,
              "builder_version": BUILDER_VERSION}
    fingerprint = source_fingerprint(listing.records, root)
    old = _up_to_date(out, params, fingerprint)
    if old is not None:
        log.info("%s is up to date with %s; nothing to do", out, root)
        return old

    jobs = _plan_jobs(listing.records, root, out, format, shard_size, image_size, seed,
                      rescale_masks=layout == "radiography")
    for subset in {j.rel_path.split("/")[0] for j in jobs}:
        (out / subset).mkdir(parents=True, exist_ok=True)
    results = _run_jobs(jobs, workers or os.cpu_count() or 1, progress)
    bad += [b for r in results for b in r["bad"]]
    if bad and not skip_bad:
        _fail_on_bad(bad, [r["tmp"] for r in results])
    manifest = _manifest(listing, results, params, fingerprint, root, len(bad))
    _commit(out, results, manifest, bad, [n for r in results for n in r["notes"]])
    return manifest


def _manifest(listing, results: list[dict], params: dict, fingerprint: str, root: Path, n_bad: int) -> dict:
    counts: dict[str, dict[str, dict[str, int]]] = {}
    shards: dict[str, dict[str, list[dict]]] = {}
    for r in results:
        subset, name = r["path"].split("/")
        split = name.rsplit("-", 1)[0]
        per_class = counts.setdefault(subset, {}).setdefault(split, {c: 0 for c in listing.classes[subset]})
        for c, n in r["counts"].items():
            per_class[c] += n
        shards.setdefault(subset, {}).setdefault(split, []).append(
            {k: r[k] for k in ("path", "samples", "bytes", "sha256")})
    return {
        "builder_version": BUILDER_VERSION, "format": params["format"], "image_size": params["image_size"],
        "layout": params["layout"], "params": params,
        "source": {"root": str(root), "fingerprint": fingerprint, "images": len(listing.records)},
        "label_names": list(CLASS_NAMES), "classes": listing.classes, "label_map": listing.label_map,
        "counts": counts, "shards": shards, "skipped": n_bad,
        "converted": len({n["path"] for r in results for n in r["notes"]}),
    }


def _commit(out: Path, results: list[dict], manifest: dict, bad: list[dict], notes: list[dict]) -> None:
    """Swap the new shards in: old manifest out, shards renamed, stale shards removed, manifest last."""
    (out / "manifest.json").unlink(missing_ok=True)
    keep = set()
    for r in results:
        os.replace(r["tmp"], out / r["path"])
        keep.add(r["path"])
    for subset in manifest["shards"]:
        for tar in (out / subset).glob("*.tar"):
            if f"{subset}/{tar.name}" not in keep:
                tar.unlink()
    for name, rows in (("skipped.jsonl", bad), ("notes.jsonl", notes)):
        if rows:
            _atomic_write_text(out / name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            log.warning("%d %s written to %s", len(rows), name.split(".")[0], out / name)
        else:
            (out / name).unlink(missing_ok=True)
    _atomic_write_text(out / "manifest.json", json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    total = sum(e["samples"] for s in manifest["shards"].values() for es in s.values() for e in es)
    log.info("wrote %d samples in %d shards to %s", total, len(results), out)


def format_tables(manifest: dict) -> str:
    """Table I/II-style text: one table per subset, classes as rows, splits as columns."""
    lines = []
    titles = {"lung": "lung segmentation subset", "infection": "infection segmentation subset"}
    for subset, splits in sorted(manifest["counts"].items(), key=lambda kv: (kv[0] != "lung", kv[0])):
        names = [s for s in ("train", "val", "test") if s in splits] + sorted(set(splits) - {"train", "val", "test"})
        classes = manifest["classes"][subset]
        width = max(len(c) for c in classes + ["total"]) + 2
        total = sum(sum(splits[s].values()) for s in names)
        lines.append(f"{titles.get(subset, subset)} ({total:,} images)")
        lines.append("class".ljust(width) + "".join(s.capitalize().rjust(9) for s in names))
        for c in classes:
            lines.append(c.ljust(width) + "".join(f"{splits[s].get(c, 0):>9,}" for s in names))
        lines.append("total".ljust(width) + "".join(f"{sum(splits[s].values()):>9,}" for s in names))
        lines.append("")
    lines.append(f"format {manifest['format']}, {manifest['image_size']}px, skipped {manifest.get('skipped', 0)}, "
                 f"converted {manifest.get('converted', 0)}")
    return "\n".join(lines)


def cli_build(args: argparse.Namespace) -> int:
    manifest = build_shards(args.input, args.output, layout=args.layout, format=args.format,
                            shard_size=args.shard_size, workers=args.workers, skip_bad=args.skip_bad,
                            seed=args.seed, val_fraction=args.val_fraction)
    print(format_tables(manifest))
    return 0


def cli_info(args: argparse.Namespace) -> int:
    from mtlxray.data.loader import read_manifest

    manifest = read_manifest(args.root)
    if args.json:
        print(json.dumps(manifest["counts"], indent=1, sort_keys=True))
    else:
        print(format_tables(manifest))
    return 0

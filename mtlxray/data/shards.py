"""Pack a dataset folder into WebDataset tar shards plus manifest.json.

Output: `OUTPUT/<subset>/<split>-NNNNNN.tar` and `OUTPUT/manifest.json`. Every tar is byte-for-byte
deterministic (fixed member order, mtime, owner and mode). Shards are written into a private
staging folder inside OUTPUT (each through `mtlxray.io.atomic_path`), then renamed into place once
all succeeded; the manifest is written last, so a shard set without a manifest is never read and a
failed build leaves the previous set as it was. A re-run whose inputs and parameters match the
manifest is a no-op.

Sample members (`<key>.<field>`): `img`, `lung`, `inf` as `.png` or `.raw` (uint8, side x side;
masks 0/1, `inf` all zero where there is no annotation), `cls.json` and `box.json`.

Images are read by `mtlxray.data.images.read_grayscale` (the reader `predict` uses, with the same
pixel limit). The manifest's image table holds each sample's content and perceptual hash
(`mtlxray.data.audit`), which `--dedupe`, `--exclude-from` and `mtlxray shards audit` use.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import multiprocessing as mp
import os
import re
import shutil
import tarfile
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from PIL import Image

from mtlxray.data import audit as audit_mod, images
from mtlxray.data.boxes import bounding_boxes
from mtlxray.data.images import ImageReadError, read_grayscale
from mtlxray.data.sources import (CLASS_SCHEMES, RADIOGRAPHY_RELEASE, Record, list_source,
                                  source_fingerprint)
from mtlxray.errors import ConfigError, DataError
from mtlxray.data.manifest import SUBSETS, read_manifest
from mtlxray.io import atomic_path, write_text_atomic

__all__ = ["BUILDER_VERSION", "IMAGE_SIZE", "DEFAULT_OUTPUT", "DEDUPE_MODES", "build_shards", "sample_key",
           "format_tables", "release_check", "refuse_other_set"]

log = logging.getLogger(__name__)

BUILDER_VERSION = 2
IMAGE_SIZE = 256
DEFAULT_OUTPUT = "shards/synthetic"
DEDUPE_MODES = ("none", "drop", "keep-first")
_MTIME = 0  # fixed member mtime: identical inputs give identical tar bytes
_SPLIT_RANK = {"test": 0, "val": 1, "train": 2}  # keep-first keeps the copy in the evaluation split
_SUBSET_RANK = {"lung": 0, "infection": 1}


class _Bad(Exception):
    """A sample that cannot be written; carries the reason."""


def _sanitise(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_")


def sample_key(rec: Record) -> str:
    """`__key__` for a record: subset, split, class and file stem, with no dots or spaces."""
    return "_".join(_sanitise(s) for s in (rec.subset, rec.split, rec.class_name, Path(rec.image.name).stem))


def _read(path: Path, what: str, notes: list[str], max_pixels: int) -> np.ndarray:
    try:
        return read_grayscale(path, max_pixels=max_pixels, notes=notes, what=what)
    except ImageReadError as e:
        raise _Bad(f"{what}: {e.reason}") from None


def _binary_mask(arr: np.ndarray, what: str) -> np.ndarray:
    # Two comparisons instead of np.unique (a sort or hash of every pixel): the check ran at ~1 ms a mask.
    top = int(arr.max(initial=0))
    if top <= 1:
        return arr.astype(np.uint8, copy=False)
    if top == 255:
        mask = arr != 0
        if np.count_nonzero(mask) == np.count_nonzero(arr == 255):  # nothing between 0 and 255
            return mask.view(np.uint8)
    values = set(np.unique(arr).tolist())
    shown = sorted(values)[:6]
    raise _Bad(f"{what} values {shown}{'...' if len(values) > 6 else ''} are not in {{0,1}} or {{0,255}}")


def _load_mask(path: Path, shape: tuple[int, int], what: str, rescale: bool, notes: list[str],
               max_pixels: int) -> np.ndarray:
    mask = _binary_mask(_read(path, what, notes, max_pixels), what)
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
                 notes: list[str], max_pixels: int) -> tuple[dict, dict]:
    """(tar members, facts: hashes, the source path under `root` and whether the stored lung mask is empty)."""
    img = _read(rec.image, "image", notes, max_pixels)
    lung = _load_mask(rec.lung_mask, img.shape, "lung mask", rescale_masks, notes, max_pixels)
    if rec.inf_mask is not None:
        inf = _load_mask(rec.inf_mask, img.shape, "infection mask", rescale_masks, notes, max_pixels)
    else:
        inf = np.zeros_like(img)
    facts = {"content": audit_mod.content_hash(img), "phash": audit_mod.perceptual_hash(img)}
    stored_lung_empty = not lung.any()
    img, lung, inf = _resize(img, size, False), _resize(lung, size, True), _resize(inf, size, True)
    if stored_lung_empty or not lung.any():
        notes.append("lung mask is empty" + ("" if stored_lung_empty else f" after resizing to {size} px"))
        facts["empty_lung"] = True
    facts["source"] = str(rec.image.relative_to(root))
    meta = {"label": rec.label, "class_name": rec.class_name, "source_path": facts["source"],
            "subset": rec.subset, "split": rec.split}
    sample = {"__key__": key, f"img.{fmt}": _encode(img, fmt), f"lung.{fmt}": _encode(lung, fmt),
              f"inf.{fmt}": _encode(inf, fmt), "cls.json": json.dumps(meta, sort_keys=True).encode(),
              "box.json": json.dumps(bounding_boxes(inf)).encode()}
    return sample, facts


def _member_info(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode, info.uname, info.gname = size, _MTIME, 0o444, "mtlxray", "mtlxray"
    return info


def _header_template() -> tuple[bytes, bytes, bytes, int]:
    """The fields of a member header that do not depend on its name and size (mode, uid, gid; mtime;
    type onwards), taken from the header tarfile writes, and the sum of their bytes plus the
    checksum field's eight spaces."""
    ref = _member_info("x", 0).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")
    mode_ids, mtime, tail = ref[100:124], ref[136:148], ref[156:512]
    return mode_ids, mtime, tail, sum(mode_ids) + sum(mtime) + sum(tail) + 8 * 32


class _ShardTar:
    """A shard's tar written sample by sample, with the bytes webdataset's `TarWriter(encoder=False,
    mtime=0, user="mtlxray", group="mtlxray", mode=0o444)` writes (fields sorted, `<key>.<field>`
    members, tarfile's PAX-format headers, two end blocks, padding to tarfile's 10,240-byte records),
    hashed as they are written.

    Hand-written because going through tarfile's TarFile and stream (a copy of every header object,
    buffered stream writes) cost 0.33 ms of CPU per five-member sample. A member whose ASCII name
    fits the 100-byte name field and whose size fits its 11 octal digits (every member the builder
    writes) gets tarfile's plain ustar header from a template: the name, the size and the checksum
    filled in (`TarInfo.tobuf` for each took ~0.1 ms of a sample's ~2 ms); any other member gets
    `TarInfo.tobuf` itself, PAX records included.
    """

    _MODE_IDS, _MTIME_FIELD, _TAIL, _FIXED_SUM = _header_template()

    def __init__(self, f):
        self.f, self.digest, self.offset = f, hashlib.sha256(), 0

    def _put(self, data: bytes) -> None:
        self.digest.update(data)
        self.f.write(data)
        self.offset += len(data)

    def _header(self, name: str, size: int) -> bytes:
        if name.isascii() and len(name) <= 100 and size < 8 ** 11:
            name_field, size_field = name.encode("ascii").ljust(100, tarfile.NUL), b"%011o\0" % size
            checksum = sum(name_field) + sum(size_field) + self._FIXED_SUM
            return name_field + self._MODE_IDS + size_field + self._MTIME_FIELD + b"%06o\0 " % checksum + self._TAIL
        return _member_info(name, size).tobuf(tarfile.PAX_FORMAT, "utf-8", "surrogateescape")

    def write(self, sample: dict) -> None:
        key = sample["__key__"]
        for field in sorted(k for k in sample if k != "__key__"):
            data = sample[field]
            self._put(self._header(f"{key}.{field}", len(data)))
            self._put(data)
            if len(data) % tarfile.BLOCKSIZE:
                self._put(tarfile.NUL * (tarfile.BLOCKSIZE - len(data) % tarfile.BLOCKSIZE))

    def close(self) -> None:
        self._put(tarfile.NUL * (2 * tarfile.BLOCKSIZE))
        if self.offset % tarfile.RECORDSIZE:
            self._put(tarfile.NUL * (tarfile.RECORDSIZE - self.offset % tarfile.RECORDSIZE))


@dataclass(frozen=True)
class _ShardJob:
    root: str
    stage: str
    rel_path: str
    items: tuple[tuple[str, Record], ...]
    fmt: str
    size: int
    rescale_masks: bool
    max_pixels: int


def _write_shard(job: _ShardJob) -> dict:
    """Write one shard into the staging folder; returns its stats, image rows, bad inputs and notes."""
    root = Path(job.root)
    bad: list[dict] = []
    notes: list[dict] = []
    rows: list[list[str]] = []
    counts: dict[str, int] = {}
    empty = 0
    with atomic_path(Path(job.stage) / job.rel_path) as tmp:
        with open(tmp, "wb") as f:
            writer = _ShardTar(f)
            for key, rec in job.items:
                sample_notes: list[str] = []
                try:
                    sample, facts = _make_sample(key, rec, root, job.fmt, job.size, job.rescale_masks,
                                                 sample_notes, job.max_pixels)
                except _Bad as e:
                    bad.append({"path": str(rec.image), "reason": str(e)})
                    continue
                notes.extend({"path": str(rec.image), "note": n} for n in sample_notes)
                writer.write(sample)
                rows.append([key, rec.subset, rec.split, rec.class_name, job.rel_path,
                             facts["source"], facts["content"], facts["phash"]])
                counts[rec.class_name] = counts.get(rec.class_name, 0) + 1
                empty += bool(facts.get("empty_lung"))
            writer.close()
        size = tmp.stat().st_size
        digest = writer.digest.hexdigest()  # of the bytes as written: no second read of the shard
    return {"staged": str(Path(job.stage) / job.rel_path), "path": job.rel_path, "samples": len(rows),
            "bytes": size, "sha256": digest, "bad": bad, "notes": notes, "counts": counts, "rows": rows,
            "empty_lung": empty, "considered": len(job.items)}


def _hash_record(job: tuple[str, Record, int]) -> tuple[str, Optional[str], Optional[str]]:
    """(key, content hash, perceptual hash) of a record's image; None hashes when unreadable."""
    key, rec, max_pixels = job
    try:
        img = read_grayscale(rec.image, max_pixels=max_pixels)
    except ImageReadError:
        return key, None, None
    return key, audit_mod.content_hash(img), audit_mod.perceptual_hash(img)


def _keyed(records: list[Record]) -> dict[str, Record]:
    keyed: dict[str, Record] = {}
    for rec in records:
        key = sample_key(rec)
        if key in keyed:  # sanitising can merge names; keep keys unique and stable
            key = f"{key}_{hashlib.sha256(str(rec.image).encode()).hexdigest()[:8]}"
        keyed[key] = rec
    return keyed


def _plan_jobs(keyed: dict[str, Record], root: Path, stage: Path, fmt: str, shard_size: int, size: int,
               seed: int, rescale_masks: bool, max_pixels: int) -> list[_ShardJob]:
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
            jobs.append(_ShardJob(str(root), str(stage), f"{subset}/{split}-{n:06d}.tar",
                                  tuple(items[start:start + shard_size]), fmt, size, rescale_masks, max_pixels))
    return jobs


def _safe_rel(rel: object) -> bool:
    parts = str(rel).replace("\\", "/").split("/")
    return isinstance(rel, str) and not rel.startswith("/") and ".." not in parts and ":" not in rel


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
                if not _safe_rel(e.get("path")):
                    return None
                p = out / e["path"]
                if not p.is_file() or p.stat().st_size != e["bytes"]:
                    return None
    return old


def _pool_map(fn, jobs: list, workers: int, progress: bool, desc: str, weight=lambda j: 1) -> list:
    from tqdm import tqdm

    results = []
    with tqdm(total=sum(weight(j) for j in jobs), desc=desc, unit="img", disable=not progress) as bar:
        if workers <= 1 or len(jobs) <= 1:
            for job in jobs:
                results.append(fn(job))
                bar.update(weight(job))
        else:
            with mp.get_context("fork").Pool(min(workers, len(jobs))) as pool:
                for job, res in zip(jobs, pool.imap(fn, jobs, chunksize=1 if len(jobs) < 64 else 16)):
                    results.append(res)
                    bar.update(weight(job))
    return results


def _fail_on_bad(bad: list[dict]) -> None:
    for b in bad[:20]:
        log.error("bad input %s: %s", b["path"], b["reason"])
    first = bad[0]
    raise DataError(f"{first['path']}: {first['reason']} ({len(bad)} bad input(s) in all; "
                    "--skip-bad skips them and lists them in skipped.jsonl)")


def _other_test_images(others: Sequence[str]) -> list[tuple[str, list]]:
    out = []
    for other in others:
        manifest = read_manifest(other)
        refs = [r for r in audit_mod.manifest_images(manifest.raw, str(other)) if r.split == "test"]
        out.append((str(other), refs))
    return out


def _select(keyed: dict[str, Record], root: Path, dedupe: str, exclude_from: Sequence[str], threshold: int,
            workers: int, progress: bool, max_pixels: int) -> tuple[dict[str, Record], dict]:
    """Drop duplicates (`dedupe`) and images found in other sets' test splits (`exclude_from`)."""
    info: dict = {"mode": dedupe, "threshold": threshold, "exclude_from": [], "dropped": []}
    if dedupe == "none" and not exclude_from:
        return keyed, info
    hashed = _pool_map(_hash_record, [(k, r, max_pixels) for k, r in keyed.items()], workers, progress, "hash")
    refs = [audit_mod.ImageRef("build", rec.subset, rec.split, rec.class_name, key, "", "", c, p)
            for (key, c, p), rec in zip(hashed, keyed.values()) if c is not None]
    dropped: dict[str, str] = {}
    for name, other in _other_test_images(exclude_from):
        hits = audit_mod.overlap_images(refs, other, threshold)
        n_before = len(dropped)
        for pair in hits:
            dropped.setdefault(pair.a.key, f"{pair.kind} duplicate of {pair.b.key} in the test split of {name} "
                                           f"(--exclude-from)")
        info["exclude_from"].append({"shards": name, "test_images": len(other), "dropped": len(dropped) - n_before})
    if dedupe != "none":
        rank = lambda r: (_SPLIT_RANK.get(r.split, 9), _SUBSET_RANK.get(r.subset, 9), r.key)  # noqa: E731
        kept = [r for r in refs if r.key not in dropped]
        for group in audit_mod.duplicate_groups(kept, threshold):
            members = sorted((kept[i] for i in group), key=rank)
            first = members[0]
            for r in (members if dedupe == "drop" else members[1:]):
                # A few names, not all: every drop naming every other copy is N^2 text for N copies.
                named = [m.key for m in members[:4] if m is not r][:3]
                more = len(members) - 1 - len(named)
                others = ", ".join(named) + (f" and {more:,} more" if more else "")
                dropped.setdefault(r.key, f"duplicate of {others if dedupe == 'drop' else first.key} "
                                          f"(--dedupe {dedupe})")
    info["dropped"] = [{"key": k, "path": str(keyed[k].image), "reason": why} for k, why in sorted(dropped.items())]
    return {k: r for k, r in keyed.items() if k not in dropped}, info


def build_shards(input: str | Path, output: str | Path, *, layout: str = "covid-qu-ex", format: str = "png",
                 shard_size: int = 1000, workers: int = 0, skip_bad: bool = False, seed: int = 0,
                 val_fraction: float = 0.2, image_size: int = IMAGE_SIZE, progress: bool = True,
                 classes: str = "covid3", dedupe: str = "none", exclude_from: Sequence[str | Path] = (),
                 near_threshold: int = audit_mod.NEAR_THRESHOLD, max_pixels: Optional[int] = None) -> dict:
    """Build the shard set and return the manifest (unchanged and unwritten when already up to date).

    `classes`: label scheme (covid3, or radiography4 for the Radiography DB). `dedupe`: none, drop
    (every copy of a duplicated image) or keep-first (one copy; the first in test, val, train order,
    lung before infection, then by key). `exclude_from`: shard sets whose test images (exact or near
    copies) are left out of this build. `max_pixels`: the pixel limit (default `images.MAX_PIXELS`,
    the limit `predict` applies).
    """
    max_pixels = images.MAX_PIXELS if max_pixels is None else int(max_pixels)
    if format not in ("png", "raw"):
        raise DataError(f"unknown shard format {format!r}; choose png or raw")
    if shard_size < 1:
        raise DataError(f"shard size must be >= 1, got {shard_size}")
    if image_size < 16:
        raise DataError(f"image size must be >= 16, got {image_size}")
    if dedupe not in DEDUPE_MODES:
        raise DataError(f"unknown dedupe mode {dedupe!r}; choose one of {', '.join(DEDUPE_MODES)}")
    root, out = Path(input).resolve(), Path(output)
    listing = list_source(layout, root, seed, val_fraction, classes)
    bad = [asdict(b) for b in listing.bad]
    if bad and not skip_bad:
        _fail_on_bad(bad)
    if not listing.records:
        raise DataError(f"{root}: no images found in the {layout} layout")
    exclude = [str(x) for x in exclude_from]
    exclude_ids = []
    if exclude:
        exclude_ids = [{"shards": x, "fingerprint": read_manifest(x).fingerprint}
                       for x in exclude]
    params = {"layout": layout, "format": format, "shard_size": shard_size, "seed": seed,
              "val_fraction": val_fraction, "image_size": image_size, "skip_bad": skip_bad,
              "builder_version": BUILDER_VERSION, "classes": classes, "dedupe": dedupe,
              "exclude_from": exclude_ids, "near_threshold": near_threshold, "max_pixels": max_pixels}
    fingerprint = source_fingerprint(listing.records, root)
    old = _up_to_date(out, params, fingerprint)
    if old is not None:
        log.info("%s is up to date with %s; nothing to do", out, root)
        return old

    workers = workers or os.cpu_count() or 1
    keyed, dedupe_info = _select(_keyed(listing.records), root, dedupe, exclude, near_threshold, workers,
                                 progress, max_pixels)
    out.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(dir=out, prefix=".build-"))
    try:
        jobs = _plan_jobs(keyed, root, stage, format, shard_size, image_size, seed,
                          rescale_masks=layout == "radiography", max_pixels=max_pixels)
        results = _pool_map(_write_shard, jobs, workers, progress, "shards", weight=lambda j: len(j.items))
        bad += [b for r in results for b in r["bad"]]
        if bad and not skip_bad:
            _fail_on_bad(bad)
        notes = [n for r in results for n in r["notes"]]
        notes += [{"path": d["path"], "note": f"dropped: {d['reason']}"} for d in dedupe_info["dropped"]]
        manifest = _manifest(listing, results, params, fingerprint, root, len(bad), dedupe_info, near_threshold)
        _commit(out, results, manifest, bad, notes)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    return manifest


def _duplicates_summary(rows: list[list[str]], threshold: int) -> dict:
    return audit_mod.summary([audit_mod._ref("", row) for row in rows], threshold)


def _manifest(listing, results: list[dict], params: dict, fingerprint: str, root: Path, n_bad: int,
              dedupe_info: dict, threshold: int) -> dict:
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
    rows = sorted((row for r in results for row in r["rows"]), key=lambda row: row[0])
    scheme = params["classes"]
    return {
        "builder_version": BUILDER_VERSION, "format": params["format"], "image_size": params["image_size"],
        "layout": params["layout"], "params": params,
        "source": {"root": str(root), "fingerprint": fingerprint, "images": len(listing.records)},
        "label_scheme": scheme, "label_names": list(CLASS_SCHEMES[scheme]["names"]),
        "classes": listing.classes, "label_map": listing.label_map,
        "counts": counts, "shards": shards, "skipped": n_bad,
        "converted": len({n["path"] for r in results for n in r["notes"] if "lung mask is empty" not in n["note"]}),
        "empty_lung_masks": sum(r["empty_lung"] for r in results),
        "dedupe": {**dedupe_info, "dropped_count": len(dedupe_info["dropped"])},
        "duplicates": _duplicates_summary(rows, threshold),
        "images": {"columns": list(audit_mod.IMAGE_COLUMNS), "rows": rows},
    }


def manifest_text(manifest: dict) -> str:
    """The manifest as JSON: indented, except the image table, which has one compact row per line."""
    table = manifest.get("images")
    if not isinstance(table, dict):
        return json.dumps(manifest, indent=1, sort_keys=True, allow_nan=False) + "\n"
    marker = "@@IMAGE_ROWS@@"
    text = json.dumps({**manifest, "images": {"columns": table["columns"], "rows": marker}}, indent=1,
                      sort_keys=True, allow_nan=False)
    rows = ",\n   ".join(json.dumps(r, separators=(",", ":")) for r in table["rows"])
    return text.replace(json.dumps(marker), f"[\n   {rows}\n  ]" if rows else "[]") + "\n"


def _commit(out: Path, results: list[dict], manifest: dict, bad: list[dict], notes: list[dict]) -> None:
    """Swap the new shards in: old manifest out, shards renamed, stale shards removed, manifest last."""
    (out / "manifest.json").unlink(missing_ok=True)
    keep = set()
    for r in results:
        (out / r["path"]).parent.mkdir(parents=True, exist_ok=True)
        os.replace(r["staged"], out / r["path"])
        keep.add(r["path"])
    for subset in SUBSETS:
        for tar in (out / subset).glob("*.tar") if (out / subset).is_dir() else ():
            if f"{subset}/{tar.name}" not in keep:
                tar.unlink()
    for name, rows in (("skipped.jsonl", bad), ("notes.jsonl", notes)):
        if rows:
            write_text_atomic(out / name, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
            log.warning("%d %s written to %s", len(rows), name.split(".")[0], out / name)
        else:
            (out / name).unlink(missing_ok=True)
    write_text_atomic(out / "manifest.json", manifest_text(manifest))
    total = sum(e["samples"] for s in manifest["shards"].values() for es in s.values() for e in es)
    log.info("wrote %d samples in %d shards to %s", total, len(results), out)


def release_check(manifest: dict) -> Optional[str]:
    """For a Radiography DB build: whether its images per class match the release's 21,165."""
    if manifest.get("layout") != "radiography":
        return None
    have: dict[str, int] = {}
    for splits in manifest["counts"].values():
        for per_class in splits.values():
            for c, n in per_class.items():
                have[c] = have.get(c, 0) + n
    total = sum(RADIOGRAPHY_RELEASE.values())
    if have == RADIOGRAPHY_RELEASE:
        return f"Radiography DB: matches the release ({total:,} images: " + ", ".join(
            f"{c} {n:,}" for c, n in RADIOGRAPHY_RELEASE.items()) + ")"
    diffs = []
    for c, want in RADIOGRAPHY_RELEASE.items():
        n = have.get(c, 0)
        if n != want:
            diffs.append(f"{c} {n:,} of {want:,} ({n - want:+,})")
    diffs += [f"{c} {n:,} (not in the release)" for c, n in have.items() if c not in RADIOGRAPHY_RELEASE]
    return (f"Radiography DB: DIFFERS from the release ({sum(have.values()):,} of {total:,} images): "
            + "; ".join(diffs))


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
                 f"converted {manifest.get('converted', 0)}, empty lung masks {manifest.get('empty_lung_masks', 0)}")
    if "label_names" in manifest:
        lines.append(f"labels ({manifest.get('label_scheme', 'covid3')}): "
                     + ", ".join(f"{i} {n}" for i, n in enumerate(manifest["label_names"])))
    dup = manifest.get("duplicates")
    if dup:
        dd = manifest.get("dedupe", {})
        lines.append(f"duplicates: {dup['exact_pairs']} exact and {dup['near_pairs']} near pair(s), "
                     f"{dup['leakage_pairs']} across splits (dedupe {dd.get('mode', 'none')}, "
                     f"{dd.get('dropped_count', 0)} dropped)")
    check = release_check(manifest)
    if check:
        lines.append(check)
    return "\n".join(lines)


def refuse_other_set(out: Path, *, input: str | Path, layout: str, format: str, image_size: int,
                     classes: str) -> None:
    """Before building into `out` by default: never rebuild its set as a different kind of set."""
    path = out / "manifest.json"
    if not path.is_file():
        return
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return
    params = old.get("params", {})
    want = {"format": format, "image_size": image_size, "layout": layout, "classes": classes}
    have = {"format": old.get("format"), "image_size": old.get("image_size"), "layout": old.get("layout"),
            "classes": params.get("classes", "covid3")}
    differ = [k for k in want if want[k] != have[k]]
    old_root = old.get("source", {}).get("root")
    if old_root and Path(old_root) != Path(input).resolve():
        differ.append("input")
    if differ:
        what = ", ".join(f"{k} {have[k] if k != 'input' else old_root}" for k in differ)
        raise ConfigError(f"{out} already holds another shard set ({what}); pass --output to write this one "
                          f"elsewhere, or remove {out} first")

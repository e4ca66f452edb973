"""`mtlxray predict`: lung and infection masks, class probabilities and severity for image files.

Each input image is read as grayscale, resized to the model's input size, and its predicted masks
are resized back to the original size. Per image the output folder gets

    masks/<name>_lung.png, masks/<name>_inf.png   0/255 masks at the original size
                                                 (<name>: the file's stem, made file-name safe)
    overlays/<name>_overlay.png                  lung and infection drawn on the image
    predictions.jsonl                            one JSON line per image

Severity is the infected lung area over the lung area, in percent (infection pixels outside the
predicted lung are not counted). With a gate P (after MultiCheXNet), infection is reported only
when P(COVID-19) >= P; otherwise the infection mask is empty and severity is null. A phase-1
checkpoint has no infection output, so it never reports infection.

A file that cannot be used (unreadable, not an image, larger than the decompression-bomb limit)
is reported in errors.jsonl and on stderr while the others carry on; the exit code is then 1.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import sys
import tempfile
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from mtlxray import CLASS_NAMES
from mtlxray.errors import DataError
from mtlxray.report.figures import overlay_rgb
from mtlxray.report.markdown import write_text_atomic

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""Suffixes picked up from folders; files named explicitly are tried whatever their suffix."""
COVID = CLASS_NAMES.index("COVID-19")


@dataclass(frozen=True)
class Failure:
    """An input that could not be processed, and why."""

    path: str
    error: str


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[Failure]]:
    """Files named directly plus the image files of named folders (sorted, not recursive)."""
    files: list[Path] = []
    failures: list[Failure] = []
    for item in map(Path, inputs):
        if item.is_dir():
            files += sorted(p for p in item.iterdir()
                            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."))
        elif item.is_file():
            files.append(item)
        else:
            failures.append(Failure(str(item), "no such file or folder"))
    return files, failures


def load_gray(path: Path, max_pixels: int | None = None) -> np.ndarray:
    """An image file as H×W uint8 grayscale; DataError naming the file if it cannot be used.

    max_pixels: refuse larger images before decoding (default: PIL.Image.MAX_IMAGE_PIXELS).
    """
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its limit; treat that as the error it guards against.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if limit is not None and im.width * im.height > limit:
                    raise DataError(f"{path}: {im.width}x{im.height} pixels exceeds the limit of {limit} "
                                    "(decompression-bomb guard)")
                return np.array(im.convert("L"), dtype=np.uint8)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise DataError(f"{path}: not an image PIL can read") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise DataError(f"{path}: unreadable image: {e}") from None


def to_model_input(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """H×W uint8 images → B×1×size×size float in [0, 1], the scaling the shard loader uses."""
    batch = [F.interpolate(torch.from_numpy(im).float()[None, None] / 255.0, size=(size, size),
                           mode="bilinear", align_corners=False, antialias=True) for im in images]
    return torch.cat(batch)  # B×1×S×S


def _save_png(path: Path, array: np.ndarray) -> None:
    """Write a PNG through a temp file and rename."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".png")
    os.close(fd)
    try:
        Image.fromarray(array).save(tmp, format="PNG")
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _unique_name(path: Path, used: set[str]) -> str:
    """A file-name-safe stem (`Normal (4).png` -> `Normal_4`), suffixed -1, -2, ... when taken."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("_") or "image"
    name, n = stem, 1
    while name in used:
        name = f"{stem}-{n}"
        n += 1
    used.add(name)
    return name


@torch.no_grad()
def _infer(model, images: list[np.ndarray], size: int, device: torch.device):
    """Per image: (lung prob, inf prob) at the original size, class probabilities (C)."""
    out = model(to_model_input(images, size).to(device))
    probs = torch.softmax(out["cls"].float(), dim=1).cpu()  # B×C
    # A phase-1 model has no infection output; an all-zero probability map stands in for it.
    inf = out["inf"] if out["inf"] is not None else torch.full_like(out["lung"], -torch.inf)
    results = []
    for i, im in enumerate(images):
        maps = torch.cat([out["lung"][i : i + 1], inf[i : i + 1]], dim=1).float()  # 1×2×s×s
        maps = torch.sigmoid(F.interpolate(maps, size=im.shape, mode="bilinear", align_corners=False))
        results.append((maps[0, 0].cpu().numpy(), maps[0, 1].cpu().numpy(), probs[i], out["inf"] is not None))
    return results


def _record(path: Path, name: str, image: np.ndarray, lung_p: np.ndarray, inf_p: np.ndarray,
            probs: torch.Tensor, has_inf: bool, gate: float | None, out: Path) -> dict:
    """Write one image's masks and overlay; return its predictions.jsonl record."""
    lung = lung_p > 0.5
    reported = has_inf and (gate is None or float(probs[COVID]) >= gate)
    inf = (inf_p > 0.5) if reported else np.zeros_like(lung)
    lung_area = int(lung.sum())
    severity = 100.0 * int((inf & lung).sum()) / lung_area if reported and lung_area else None
    _save_png(out / "masks" / f"{name}_lung.png", lung.astype(np.uint8) * 255)
    _save_png(out / "masks" / f"{name}_inf.png", inf.astype(np.uint8) * 255)
    _save_png(out / "overlays" / f"{name}_overlay.png", overlay_rgb(image, lung, inf))
    return {
        "file": str(path),
        "name": name,
        "width": image.shape[1],
        "height": image.shape[0],
        "probs": {c: round(float(p), 6) for c, p in zip(CLASS_NAMES, probs)},
        "predicted_class": CLASS_NAMES[int(probs.argmax())],
        "infection_reported": reported,
        "lung_area_px": lung_area,
        "infection_area_px": int((inf & lung).sum()),
        "severity_percent": None if severity is None else round(severity, 3),
    }


def predict_files(model, img_size: int, paths: Sequence[Path], out: str | Path, *, gate: float | None = None,
                  batch_size: int = 8, max_pixels: int | None = None,
                  device: torch.device | str = "cpu") -> tuple[list[dict], list[Failure]]:
    """Run `model` on image files, writing masks and overlays under `out`; (records, failures)."""
    out = Path(out)
    for sub in ("masks", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    failures: list[Failure] = []
    used: set[str] = set()
    device = torch.device(device)
    for start in range(0, len(paths), batch_size):
        loaded: list[tuple[Path, np.ndarray]] = []
        for path in paths[start : start + batch_size]:
            try:
                loaded.append((path, load_gray(path, max_pixels)))
            except DataError as e:
                logger.warning("%s", e)
                failures.append(Failure(str(path), str(e)))
        if not loaded:
            continue
        results = _infer(model, [im for _, im in loaded], img_size, device)
        for (path, image), (lung_p, inf_p, probs, has_inf) in zip(loaded, results):
            records.append(_record(path, _unique_name(path, used), image, lung_p, inf_p, probs, has_inf,
                                   gate, out))
    return records, failures


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r) + "\n" for r in rows))


def cli_main(args: argparse.Namespace) -> int:
    from mtlxray.checkpoint import load_model_from_checkpoint

    if args.gate is not None and not 0.0 <= args.gate <= 1.0:
        raise DataError(f"--gate must be a probability in [0, 1], got {args.gate}")
    model, cfg = load_model_from_checkpoint(args.checkpoint)
    paths, failures = collect_inputs(args.inputs)
    out = Path(args.out)
    records, bad = predict_files(model, cfg.model.img_size, paths, out, gate=args.gate,
                                 batch_size=args.batch_size)
    failures += bad
    _write_jsonl(out / "predictions.jsonl", records)
    if failures:
        _write_jsonl(out / "errors.jsonl", (asdict(f) for f in failures))
    for r in records:
        sev = "n/a" if r["severity_percent"] is None else f"{r['severity_percent']:.1f}%"
        print(f"{r['file']}: {r['predicted_class']} (p={r['probs'][r['predicted_class']]:.3f}), severity {sev}")
    for f in failures:
        print(f"FAILED {f.path}: {f.error}", file=sys.stderr)
    print(f"{len(records)} image(s) predicted, {len(failures)} failed -> {out / 'predictions.jsonl'}")
    return 1 if failures else 0

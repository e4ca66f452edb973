"""`mtlxray predict`: lung and infection masks, class probabilities and severity for image files.

Each input image is read as grayscale, resized to the model's input size, and its predicted masks
are resized back to the original size. Per image the output folder gets

    masks/<name>_lung.png, masks/<name>_inf.png   0/255 masks at the original size
                                                 (<name>: the file's stem, made file-name safe)
    overlays/<name>_overlay.png                  lung and infection drawn on the image, with a band
                                                 below it: predicted class and probability,
                                                 severity, legend
    predictions.jsonl, predictions.csv           one record per image (the CSV has one column per
                                                 class probability; boxes as JSON)
    errors.jsonl                                 the inputs that failed, if any

Severity is the infected lung area over the lung area, in percent (infection pixels outside the
predicted lung are not counted). With a gate (after MultiCheXNet: `--gate P`, or the checkpoint's
`phase.teacher_forcing` gate), infection and boxes are reported only when the gate's P(positive
class) >= P, from the class head or a first-stage classifier (`--gate-source first_stage`,
`--first-stage CKPT`); otherwise the infection mask is empty, severity is null and `boxes` is
empty, while `boxes_ungated` keeps what the box head found (drawn grey on the overlay; reported
boxes are yellow). A phase-1 checkpoint has no infection output, so it never reports infection;
a model without a box head (`model.det_head`) has null `boxes`.

A file that cannot be used (unreadable, not an image, larger than the decompression-bomb limit)
is reported in errors.jsonl and on stderr while the others carry on; the exit code is then 1.
Every image-named entry of a folder is either predicted or reported: a broken or looping symbolic
link, or a folder named like an image, is an error line too. With nothing to predict at all (every
input missing) predict stops in one line before creating the output folder.

The output folder must be empty (or new): files of an earlier run (masks of images no longer
predicted, an old errors.jsonl) would otherwise sit beside the new ones and read as current. With
`--overwrite` predict first deletes what it writes (`PREDICT_OUTPUTS`) and keeps anything else.
Predict holds the folder for its whole run (`mtlxray.report.outdir`): a second predict into it
fails at once instead of mixing its masks with the first's. Every file is written atomically with
the mode the umask gives.
"""

from __future__ import annotations

import csv
import errno
import io
import itertools
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from mtlxray import CLASS_NAMES
from mtlxray.checkpoint import load_model_from_checkpoint
from mtlxray.data.images import read_grayscale
from mtlxray.data.loader import label_names
from mtlxray.errors import ConfigError, DataError
from mtlxray.eval.gate import Gate
from mtlxray.hardware import resolve_attention
from mtlxray.io import write_text_atomic
from mtlxray.model.detection import det_candidates, postprocess
from mtlxray.report.figures import prediction_overlay, save_png

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
"""Suffixes picked up from folders; files named explicitly are tried whatever their suffix."""
COVID = CLASS_NAMES.index("COVID-19")
PREDICT_OUTPUTS = ("masks", "overlays", "predictions.jsonl", "predictions.csv", "errors.jsonl")
"""What predict writes under its output folder (and `--overwrite` deletes first)."""
CSV_FIELDS = ["file", "name", "width", "height", "predicted_class", "infection_reported", "lung_area_px", "infection_area_px", "severity_percent", "gate_probability",
              "gate_passed", "boxes", "boxes_ungated"]
"""predictions.csv columns, with one `p_<class>` column per class of the model (its class
probabilities) after `predicted_class`; `boxes` (after the gate) and `boxes_ungated` are JSON lists of [x0, y0, x1, y1,
score] at the original size, empty cells for a model without a box head."""


@dataclass(frozen=True)
class ClassScheme:
    """The classes a model predicts, in logit order, and how logits become probabilities: a
    softmax, or for a multi-label head (`model.cls_loss: bce_multilabel`) a sigmoid per class."""

    names: tuple[str, ...] = tuple(CLASS_NAMES)
    multilabel: bool = False

    @classmethod
    def of(cls, model) -> "ClassScheme":
        cfg = getattr(model, "config", None)
        if cfg is None:
            return cls()
        return cls(tuple(label_names(cfg.data)), cfg.model.cls_loss == "bce_multilabel")

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """B×C logits -> B×C probabilities (fp32)."""
        logits = logits.float()
        return torch.sigmoid(logits) if self.multilabel else torch.softmax(logits, dim=1)


@dataclass(frozen=True)
class Failure:
    """An input that could not be processed, and why."""

    path: str
    error: str


def _not_a_file(path: Path) -> str:
    """Why `path`, which `is_file()` refused, cannot be read as an image."""
    try:
        os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "symbolic link loop"
        if path.is_symlink():
            return f"broken symbolic link (to {os.readlink(path)})"
        return "no such file or folder"
    return "a folder (folders inside folders are not searched)" if path.is_dir() else "not a regular file"


def collect_inputs(inputs: Iterable[str | Path]) -> Iterator[Path | Failure]:
    """Files named directly plus the image files of named folders (not recursive), yielded as found.

    Lazy, so that predicting a folder of 40k images starts at its first image and keeps no list of
    them: each folder's image names are read (`os.scandir`, no stat) and sorted, then checked one by
    one as they are used. Every folder entry with an image suffix (not hidden) is either a file to
    predict or a `Failure` saying why not (a broken or looping link, a folder), never dropped."""
    for item in map(Path, inputs):
        if item.is_dir():
            try:
                with os.scandir(item) as entries:
                    names = sorted(e.name for e in entries
                                   if Path(e.name).suffix.lower() in IMAGE_SUFFIXES and not e.name.startswith("."))
            except OSError as e:  # an unreadable folder is a failed input, not a failed write to --out
                yield Failure(str(item), f"unreadable folder: {e.strerror or e}")
                continue
            for name in names:
                p = item / name
                yield p if p.is_file() else Failure(str(p), _not_a_file(p))
        elif item.is_file():
            yield item
        else:
            yield Failure(str(item), _not_a_file(item))


def load_gray(path: Path, max_pixels: int | None = None, input_range: str = "auto") -> np.ndarray:
    """An image file as H×W uint8 grayscale; DataError naming the file if it cannot be used.

    The shard builder's reader (`mtlxray.data.images.read_grayscale`): 16-bit images rescaled from
    their stored bit depth (`input_range`: auto, full or minmax), DICOM through pydicom, and the same
    pixel limit (max_pixels, default `mtlxray.data.images.MAX_PIXELS`), refused before decoding.
    """
    return read_grayscale(path, max_pixels=max_pixels, input_range=input_range)


def to_model_input(images: Sequence[np.ndarray], size: int) -> torch.Tensor:
    """H×W uint8 images → B×1×size×size float in [0, 1], the scaling the shard loader uses."""
    batch = [F.interpolate(torch.from_numpy(im).float()[None, None] / 255.0, size=(size, size),
                           mode="bilinear", align_corners=False, antialias=True) for im in images]
    return torch.cat(batch)  # B×1×S×S


def _unique_name(path: Path, used: set[str]) -> str:
    """A file-name-safe stem (`Normal (4).png` -> `Normal_4`), suffixed -1, -2, ... when taken."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", path.stem).strip("_") or "image"
    name, n = stem, 1
    while name in used:
        name = f"{stem}-{n}"
        n += 1
    used.add(name)
    return name


@dataclass(frozen=True)
class _Boxes:
    """How boxes are kept and reported (the checkpoint's `model.det_*`)."""

    nms_iou: float = 0.5
    max_boxes: int = 10
    score_threshold: float = 0.3

    @classmethod
    def of(cls, model) -> "_Boxes":
        m = getattr(getattr(model, "config", None), "model", None)
        return cls(m.det_nms_iou, m.det_max_boxes, m.det_score_threshold) if m is not None else cls()


@torch.no_grad()
def _infer(model, images: list[np.ndarray], size: int, device: torch.device, gating=None):
    """Per image: (lung prob, inf prob) at the original size, class probabilities (C), whether
    there is an infection output, the gate's P(positive) (None without a gate), and the boxes
    (M×5 x0 y0 x1 y1 score at the original size, reported ones only; None without a box head)."""
    x = to_model_input(images, size).to(device)
    out = model(x)
    probs = ClassScheme.of(model).probabilities(out["cls"]).cpu()  # B×C
    gate_p = gating.probability(out, x).cpu().tolist() if gating is not None else [None] * len(images)
    # A phase-1 model has no infection output; an all-zero probability map stands in for it.
    inf = out["inf"] if out["inf"] is not None else torch.full_like(out["lung"], -torch.inf)
    box = _Boxes.of(model)
    cands = det_candidates(out["det"], (size, size)).cpu() if out.get("det") is not None else None
    results = []
    for i, im in enumerate(images):
        maps = torch.cat([out["lung"][i : i + 1], inf[i : i + 1]], dim=1).float()  # 1×2×s×s
        maps = torch.sigmoid(F.interpolate(maps, size=im.shape, mode="bilinear", align_corners=False))
        boxes = None
        if cands is not None:
            kept = postprocess(cands[i], box.nms_iou, box.max_boxes, box.score_threshold)
            scale = torch.tensor([im.shape[1] / size, im.shape[0] / size] * 2 + [1.0])
            boxes = (kept * scale).numpy()  # to the original size
        results.append((maps[0, 0].cpu().numpy(), maps[0, 1].cpu().numpy(), probs[i], out["inf"] is not None,
                        gate_p[i], boxes))
    return results


BOX_RGB = (255, 215, 0)
"""Reported infection boxes on the overlay."""
STOPPED_BOX_RGB = (150, 150, 150)
"""Boxes the gate stopped (drawn so the gate's effect is visible, in grey)."""


def draw_boxes(rgb: np.ndarray, boxes: np.ndarray, color: tuple[int, int, int]) -> np.ndarray:
    """Rectangles (x0 y0 x1 y1 in pixels, x1/y1 exclusive) drawn 1-2 px wide into the top H×W of `rgb`."""
    h, w = rgb.shape[0], rgb.shape[1]
    t = max(1, round(min(h, w) / 256))
    for x0, y0, x1, y1 in np.asarray(boxes, dtype=np.float64)[:, :4]:
        a, b = int(np.clip(np.floor(x0), 0, w - 1)), int(np.clip(np.floor(y0), 0, h - 1))
        c, d = int(np.clip(np.ceil(x1), a + 1, w)), int(np.clip(np.ceil(y1), b + 1, h))
        rgb[b:min(b + t, d), a:c] = color
        rgb[max(d - t, b):d, a:c] = color
        rgb[b:d, a:min(a + t, c)] = color
        rgb[b:d, max(c - t, a):c] = color
    return rgb


def _box_list(boxes: np.ndarray | None) -> list | None:
    return None if boxes is None else [[round(float(v), 2) for v in row] for row in boxes]


def _record(path: Path, name: str, image: np.ndarray, lung_p: np.ndarray, inf_p: np.ndarray,
            probs: torch.Tensor, has_inf: bool, gate: float | None, out: Path, gate_p: float | None = None,
            boxes: np.ndarray | None = None, classes: ClassScheme = ClassScheme()) -> dict:
    """Write one image's masks and overlay; return its predictions.jsonl record.

    gate: the threshold on `gate_p` (P(positive class)) below which no infection and no box is
    reported (`predict_files` builds the gate that gives `gate_p` whenever there is one); `boxes`:
    the box head's reported boxes at the original size (None: no box head)."""
    lung = lung_p > 0.5
    passed = gate is None or gate_p >= gate
    reported = has_inf and passed
    inf = (inf_p > 0.5) if reported else np.zeros_like(lung)
    lung_area = int(lung.sum())
    severity = 100.0 * int((inf & lung).sum()) / lung_area if reported and lung_area else None
    save_png(lung.astype(np.uint8) * 255, out / "masks" / f"{name}_lung.png")
    save_png(inf.astype(np.uint8) * 255, out / "masks" / f"{name}_inf.png")
    predicted = int(probs.argmax())
    note = "" if reported else ("no infection output (phase-1 model)" if not has_inf
                                else f"P(positive) {gate_p:.3f} below the gate {gate:g}")
    overlay = prediction_overlay(image, lung, inf if reported else None, predicted_class=classes.names[predicted],
                                 probability=float(probs[predicted]), severity=severity, note=note)
    if boxes is not None and len(boxes):
        draw_boxes(overlay, boxes, BOX_RGB if passed else STOPPED_BOX_RGB)
    save_png(overlay, out / "overlays" / f"{name}_overlay.png")
    return {
        "file": str(path),
        "name": name,
        "width": image.shape[1],
        "height": image.shape[0],
        "probs": {c: round(float(p), 6) for c, p in zip(classes.names, probs)},
        "predicted_class": classes.names[predicted],
        "infection_reported": reported,
        "lung_area_px": lung_area,
        "infection_area_px": int((inf & lung).sum()),
        "severity_percent": None if severity is None else round(severity, 3),
        "gate_probability": None if gate_p is None else round(float(gate_p), 6),
        "gate_passed": None if gate is None else bool(passed),
        "boxes": None if boxes is None else (_box_list(boxes) if passed else []),
        "boxes_ungated": _box_list(boxes),
    }


def predict_files(model, img_size: int, paths: Iterable[Path | Failure], out: str | Path, *,
                  gate: float | None = None, batch_size: int = 8, max_pixels: int | None = None,
                  device: torch.device | str = "cpu", gating=None, input_range: str = "auto",
                  progress: bool = False) -> tuple[list[dict], list[Failure]]:
    """Run `model` on image files, writing masks and overlays under `out`; (records, failures).

    `paths` is consumed lazily, batch by batch (`collect_inputs`' walk: its `Failure`s are kept in
    order with those of unreadable files). `progress`: a count and rate on a terminal's stderr (no
    total: the walk is not counted first).

    The model runs as given (its device, dtype and attention kernel); `load_predictor` prepares
    one for CPU. `gate`: report infection and boxes only when P(COVID-19) under the class head is
    at least this; `gating` (a `mtlxray.eval.gate.Gate`: the class head or a first-stage classifier, its
    positive classes and threshold) replaces it. ConfigError for a gate outside [0, 1] or a batch
    size below 1. `input_range`: how 16-bit images are scaled (`mtlxray.data.images`)."""
    check_gate(gate)
    if gating is None and gate is not None:
        cfg = getattr(model, "config", None)
        gating = Gate("cls_head", cfg.phase.positive_classes if cfg is not None else [COVID], gate,
                      multilabel=cfg is not None and cfg.model.cls_loss == "bce_multilabel")
    if gating is not None:
        gate = gating.threshold
    if batch_size < 1:
        raise ConfigError(f"batch size must be at least 1, got {batch_size}")
    out = Path(out)
    for sub in ("masks", "overlays"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    records: list[dict] = []
    failures: list[Failure] = []
    used: set[str] = set()
    device = torch.device(device)
    classes = ClassScheme.of(model)
    items = iter(paths)
    with tqdm(desc="predict", unit="img", disable=None if progress else True) as bar:
        while batch := list(itertools.islice(items, batch_size)):
            loaded: list[tuple[Path, np.ndarray]] = []
            for path in batch:
                if isinstance(path, Failure):
                    failures.append(path)
                    continue
                try:
                    loaded.append((path, load_gray(path, max_pixels, input_range)))
                except DataError as e:
                    logger.warning("%s", e)
                    failures.append(Failure(str(path), str(e)))
            if loaded:
                results = _infer(model, [im for _, im in loaded], img_size, device, gating)
                for (path, image), (lung_p, inf_p, probs, has_inf, gate_p, boxes) in zip(loaded, results):
                    records.append(_record(path, _unique_name(path, used), image, lung_p, inf_p, probs, has_inf,
                                           gate, out, gate_p, boxes, classes))
            bar.update(len(batch))
    return records, failures


def check_gate(gate: float | None) -> None:
    """ConfigError (a usage error, exit 2) unless `gate` is None or a probability."""
    if gate is not None and not 0.0 <= gate <= 1.0:
        raise ConfigError(f"--gate must be a probability in [0, 1], got {gate}")


def _jsonl(rows: Iterable[dict]) -> str:
    return "".join(json.dumps(r) + "\n" for r in rows)


def predictions_csv(records: Sequence[dict]) -> str:
    """The records as CSV (`CSV_FIELDS`): one row per image, one `p_<class>` column per class."""
    classes = list(records[0]["probs"]) if records else list(CLASS_NAMES)
    buf = io.StringIO()
    at = CSV_FIELDS.index("predicted_class") + 1
    fields = [*CSV_FIELDS[:at], *(f"p_{c}" for c in classes), *CSV_FIELDS[at:]]
    writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    writer.writeheader()
    for r in records:
        row = {k: r[k] for k in CSV_FIELDS if k in r}
        row.update({f"p_{c}": r["probs"][c] for c in classes})
        row["severity_percent"] = "" if r["severity_percent"] is None else r["severity_percent"]
        for key in ("gate_probability", "gate_passed"):
            row[key] = "" if r.get(key) is None else r[key]
        for key in ("boxes", "boxes_ungated"):
            row[key] = "" if r.get(key) is None else json.dumps(r[key])
        writer.writerow(row)
    return buf.getvalue()


def write_predictions(out: str | Path, records: Sequence[dict], failures: Sequence[Failure] = ()) -> None:
    """predictions.jsonl and predictions.csv (always, even empty), and errors.jsonl when any input
    failed, under `out`."""
    out = Path(out)
    write_text_atomic(out / "predictions.jsonl", _jsonl(records))
    write_text_atomic(out / "predictions.csv", predictions_csv(records))
    if failures:
        write_text_atomic(out / "errors.jsonl", _jsonl(asdict(f) for f in failures))


def load_predictor(checkpoint: str | Path, device: torch.device | str = "cpu"):
    """(model, cfg) from a checkpoint or `save_pretrained` folder, ready for `predict_files` on
    `device` in fp32: eval mode, the window-attention kernel resolved for that device."""
    device = torch.device(device)
    model, cfg = load_model_from_checkpoint(checkpoint)  # MTLModel.from_pretrained, weights checked finite
    model = model.to(device).float().eval()
    model.set_attention(resolve_attention(cfg.model.attention, torch.float32, device.type))
    return model, cfg

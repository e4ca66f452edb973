"""One image reader for every layer: the shard builder, `predict` and the audit read files alike.

`read_grayscale(path)` returns an H×W uint8 array:

- 8-bit grayscale as stored; colour, palette and bilevel images converted by PIL's `convert("L")`.
- 16-bit grayscale (PNG `I;16`, or `I` within 0..65535) rescaled from its stored bit depth b,
  v -> round(v·255/(2^b-1)). Detectors export 10-, 12- or 14-bit data in 16-bit PNGs, unscaled; read
  as 16-bit it would be near black. `input_range` says how b is found:
  - `auto` (default): the PNG `sBIT` chunk (significant bits) when the pixels fit in it (when they do
    not, the writer scaled them to 16 bits as the PNG standard says, and the 16-bit range is used);
    without `sBIT`, the fewest of 8, 10, 12, 14, 16 bits that hold the largest pixel, noted (and logged
    when no `notes` list is given) when fewer than 16. An 8-bit image, its ×257 16-bit copy and its
    12-bit copy read as identical arrays.
  - `full`: b = 16 always. `minmax`: stretched over the image's own min..max.
  Clipping at 255 (`convert("L")`) would turn a 16-bit X-ray white.
- Float images (`F`) stretched over their min..max.
- DICOM (`.dcm`/`.dicom`, or the `DICM` marker at byte 128) through pydicom when installed
  (`pip install 'mtlxray[dicom]'`): the modality LUT (rescale slope/intercept), then the VOI LUT or
  window where the file has one (`apply_voi_lut`), then scaled over the range those can produce
  (`BitsStored` and the pixel representation through the rescale, or the VOI LUT's own bit depth), the
  range pydicom's windowing maps to; `minmax` stretches over min..max instead. MONOCHROME1 (white is
  low) is inverted.

One pixel limit, `MAX_PIXELS`, applies everywhere: a larger image is refused before its pixels are
decoded (PIL's own decompression-bomb warning is an error too). Errors are `ImageReadError` (a
`DataError`) naming the file, with the reason alone in `.reason`.
"""

from __future__ import annotations

import logging
import struct
import warnings
from pathlib import Path
from typing import BinaryIO, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from mtlxray.errors import DataError, error_line

__all__ = ["INPUT_RANGES", "MAX_PIXELS", "ImageReadError", "read_grayscale", "to_uint8_gray", "is_dicom",
           "png_significant_bits"]

logger = logging.getLogger(__name__)

INPUT_RANGES = ("auto", "full", "minmax")
"""How a 16-bit image's value range is found: its sBIT chunk or pixels (auto), all 16 bits, or min..max."""

STORED_BIT_DEPTHS = (8, 10, 12, 14, 16)
"""The bit depths a 16-bit file's data is inferred to have (detectors store 10, 12 or 14)."""

MAX_PIXELS = 89_478_485
"""The one pixel limit (width × height) of every image mtlxray reads: PIL's default decompression-bomb
limit (~89.5 MP, a 9459² image). Chest radiographs are at most ~4300×3500 (15 MP)."""

DICOM_SUFFIXES = (".dcm", ".dicom")


class ImageReadError(DataError):
    """An image file that cannot be used; `path` and `reason` separately, message `path: reason`."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path, self.reason = str(path), reason


def is_dicom(path: Path) -> bool:
    """By suffix, or by the `DICM` marker after the 128-byte preamble."""
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    try:
        with open(path, "rb") as f:
            f.seek(128)
            return f.read(4) == b"DICM"
    except OSError:
        return False


def png_significant_bits(source: Path | BinaryIO) -> Optional[int]:
    """The PNG `sBIT` chunk's significant bits (the largest over the colour channels), None without one.
    `source`: a path, or a binary file open on the PNG (read from its start).

    Written by hand because PIL writes `sBIT` but does not read it: the chunks before the first IDAT."""
    if not isinstance(source, (str, Path)):
        source.seek(0)
        return _significant_bits(source)
    try:
        with open(source, "rb") as f:
            return _significant_bits(f)
    except OSError:
        return None


def _significant_bits(f: BinaryIO) -> Optional[int]:
    try:
        if f.read(8) != b"\x89PNG\r\n\x1a\n":
            return None
        while True:
            head = f.read(8)
            if len(head) < 8:
                return None
            length, kind = struct.unpack(">I4s", head)
            if kind in (b"IDAT", b"IEND"):
                return None
            if kind == b"sBIT":
                data = f.read(length)
                # gray+alpha and RGBA carry the alpha's bits last; gray, RGB and palette do not
                colour = data[:3] if length in (3, 4) else data[:1]
                return max(colour) if colour else None
            f.seek(length + 4, 1)  # data and CRC
    except OSError:
        return None


def _note(notes: Optional[list[str]], text: str, warn: bool = False) -> None:
    """A conversion for the caller's `notes`; a warning that would otherwise go unseen is logged."""
    if notes is not None:
        notes.append(text)
    elif warn:
        logger.warning("%s", text)


def _scale(arr: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values in lo..hi -> uint8 0..255 (clipped; hi <= lo gives 0)."""
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    out = (np.asarray(arr, dtype=np.float64) - lo) * (255.0 / (hi - lo))
    return np.rint(np.clip(out, 0, 255)).astype(np.uint8)


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8 over its own min..max (a constant image becomes 0)."""
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("non-finite pixel values")
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def _check_input_range(input_range: str) -> None:
    if input_range not in INPUT_RANGES:
        raise ValueError(f"input range must be one of {', '.join(INPUT_RANGES)}, got {input_range!r}")


def to_uint8_gray(im: Image.Image, notes: Optional[list[str]] = None, what: str = "image", *,
                  input_range: str = "auto", significant_bits: Optional[int] = None) -> np.ndarray:
    """A loaded PIL image -> H×W uint8 by the rules of the module docstring; conversions are noted.
    `significant_bits`: the file's PNG `sBIT`, if any."""
    _check_input_range(input_range)
    mode = im.mode
    if mode == "L":
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.dtype.byteorder not in ("=", "|") or arr.dtype != np.uint16:
            arr = arr.astype(np.int64)
        top = int(arr.max())
        if arr.min() < 0 or top > 65535 or input_range == "minmax":
            _note(notes, f"{what}: {mode} image stretched over its range")
            return _stretch(arr)
        bits, inferred = 16, False
        if input_range == "auto":
            if significant_bits is not None:
                bits = significant_bits if top < 2 ** significant_bits else 16
            else:
                bits = next(b for b in STORED_BIT_DEPTHS if top < 2 ** b)
                inferred = bits < 16
        full = 2 ** bits - 1
        out = ((arr.astype(np.uint32) * 255 + full // 2) // full).astype(np.uint8)
        if inferred:
            _note(notes, f"{what}: {mode} image has no sBIT chunk; its largest value {top} fits {bits} bits: "
                         f"read as {bits}-bit data (--input-range full reads all 16 bits)", warn=True)
        else:
            source = f" (sBIT {significant_bits})" if significant_bits is not None and input_range == "auto" else ""
            _note(notes, f"{what}: {mode} image rescaled from {bits} to 8 bit{source}")
        return out
    if mode == "F":
        if notes is not None:
            notes.append(f"{what}: float image stretched over its range")
        return _stretch(np.asarray(im))
    if notes is not None and mode != "1":
        notes.append(f"{what}: {mode} image converted to grayscale")
    return np.array(im.convert("L"), dtype=np.uint8)


def _dicom_output_range(ds) -> tuple[float, float]:
    """The range the modality and VOI LUTs can produce: pydicom's windowing output range (BitsStored and
    the pixel representation through the rescale), or a VOI/modality LUT's own bit depth."""
    for seq in ("VOILUTSequence", "ModalityLUTSequence"):
        if ds.get(seq):
            return 0.0, float(2 ** int(ds[seq][0].LUTDescriptor[2]) - 1)
    bits = int(ds.get("BitsStored", ds.get("BitsAllocated", 16)))
    if int(ds.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** bits - 1)
    else:
        lo, hi = float(-(2 ** (bits - 1))), float(2 ** (bits - 1) - 1)
    slope, intercept = ds.get("RescaleSlope", None), ds.get("RescaleIntercept", None)
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _read_dicom(path: Path, max_pixels: int, notes: Optional[list[str]], what: str,
                input_range: str = "auto") -> np.ndarray:
    try:
        import pydicom
        from pydicom.pixels import apply_modality_lut, apply_voi_lut
    except ImportError:
        raise ImageReadError(path, "reading DICOM needs pydicom: pip install 'mtlxray[dicom]'") from None
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True)
        rows, cols = int(header.get("Rows", 0)), int(header.get("Columns", 0))
        if rows * cols > max_pixels:
            raise ImageReadError(path, f"{cols}x{rows} pixels exceeds the limit of {max_pixels} "
                                       "(decompression-bomb guard)")
        if int(header.get("NumberOfFrames", 1) or 1) > 1:
            raise ImageReadError(path, "multi-frame DICOM is not a radiograph (one frame expected)")
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array
    except ImageReadError:
        raise
    except Exception as e:  # pydicom raises many types (InvalidDicomError, ValueError, NotImplementedError)
        raise ImageReadError(path, f"unreadable DICOM: {error_line(e)}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour DICOM (RGB / YBR): luminance
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        photometric = "MONOCHROME2"
        out, how = _stretch(arr), "stretched over its range"
    else:
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds)
        if input_range == "minmax":
            out, how = _stretch(arr), "stretched over its range"
        else:
            lo, hi = _dicom_output_range(ds)
            out, how = _scale(arr, lo, hi), f"scaled from its range {lo:g}..{hi:g}"
    if photometric == "MONOCHROME1":
        out = 255 - out
    _note(notes, f"{what}: DICOM {photometric} read through its LUTs and {how} to 8 bit")
    return out


def read_grayscale(path: str | Path, *, max_pixels: Optional[int] = None, notes: Optional[list[str]] = None,
                   what: str = "image", input_range: str = "auto") -> np.ndarray:
    """Read an image file as H×W uint8 grayscale at its own size; `ImageReadError` naming the file if it
    cannot be used. `max_pixels` defaults to `MAX_PIXELS`; conversions are appended to `notes`;
    `input_range` (auto, full, minmax) as in the module docstring."""
    path = Path(path)
    _check_input_range(input_range)
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if path.suffix.lower() in DICOM_SUFFIXES:
        return _read_dicom(path, limit, notes, what, input_range)
    try:
        # One open for the DICOM marker, the decode and the sBIT chunk (three opens cost ~8% of a
        # shard build's time per image).
        with open(path, "rb") as f:
            f.seek(128)
            if f.read(4) == b"DICM":
                return _read_dicom(path, limit, notes, what, input_range)
            f.seek(0)
            with warnings.catch_warnings():
                # PIL only warns between 1x and 2x its own limit; that is the case it guards against.
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                with Image.open(f) as im:
                    if im.width * im.height > limit:
                        raise ImageReadError(path, f"{im.width}x{im.height} pixels exceeds the limit of {limit} "
                                                   "(decompression-bomb guard)")
                    im.load()
                    sbit = png_significant_bits(f) if im.format == "PNG" else None
                    return to_uint8_gray(im, notes, what, input_range=input_range, significant_bits=sbit)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image PIL can read (corrupt or unknown format)") from None
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(path, f"corrupt or unreadable image: {e}") from None

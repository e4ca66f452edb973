"""One image reader for every layer: the shard builder, `predict` and the audit read files alike.

`read_grayscale(path)` returns an H×W uint8 array:

- 8-bit grayscale as stored; colour, palette and bilevel images converted by PIL's `convert("L")`.
- 16-bit grayscale (PNG `I;16`, or `I` within 0..65535) rescaled by the 16-bit range, v -> round(v·255/65535).
  PNG stores samples scaled to the full range of their bit depth (a 12-bit image is left-bit-replicated
  to 16 bits), so this is the image's own range, and an 8-bit image and its ×257 16-bit copy read as
  identical arrays. Clipping at 255 (`convert("L")`) would turn a 16-bit X-ray white.
- Float images (`F`) stretched over their min..max.
- DICOM (`.dcm`/`.dicom`, or the `DICM` marker at byte 128) through pydicom when installed
  (`pip install 'mtlxray[dicom]'`): the modality LUT (rescale slope/intercept), then the VOI LUT or
  window where the file has one, then stretched over min..max; MONOCHROME1 (white is low) is inverted.

One pixel limit, `MAX_PIXELS`, applies everywhere: a larger image is refused before its pixels are
decoded (PIL's own decompression-bomb warning is an error too). Errors are `ImageReadError` (a
`DataError`) naming the file, with the reason alone in `.reason`.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from mtlxray.errors import DataError

__all__ = ["MAX_PIXELS", "ImageReadError", "read_grayscale", "to_uint8_gray", "is_dicom"]

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


def _stretch(arr: np.ndarray) -> np.ndarray:
    """Any numeric array -> uint8 over its own min..max (a constant image becomes 0)."""
    arr = np.asarray(arr, dtype=np.float64)
    lo, hi = float(arr.min()), float(arr.max())
    if not np.isfinite(lo) or not np.isfinite(hi):
        raise ValueError("non-finite pixel values")
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


def to_uint8_gray(im: Image.Image, notes: Optional[list[str]] = None, what: str = "image") -> np.ndarray:
    """A loaded PIL image -> H×W uint8 by the rules of the module docstring; conversions are noted."""
    mode = im.mode
    if mode == "L":
        return np.array(im, dtype=np.uint8)
    if mode.startswith("I;16") or mode == "I":
        arr = np.asarray(im)
        if arr.dtype.byteorder not in ("=", "|") or arr.dtype != np.uint16:
            arr = arr.astype(np.int64)
        if arr.min() < 0 or arr.max() > 65535:
            out = _stretch(arr)
            how = "stretched over its range"
        else:
            out = ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
            how = "rescaled from 16 to 8 bit"
        if notes is not None:
            notes.append(f"{what}: {mode} image {how}")
        return out
    if mode == "F":
        if notes is not None:
            notes.append(f"{what}: float image stretched over its range")
        return _stretch(np.asarray(im))
    if notes is not None and mode != "1":
        notes.append(f"{what}: {mode} image converted to grayscale")
    return np.array(im.convert("L"), dtype=np.uint8)


def _read_dicom(path: Path, max_pixels: int, notes: Optional[list[str]], what: str) -> np.ndarray:
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
        raise ImageReadError(path, f"unreadable DICOM: {str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if arr.ndim == 3:  # colour DICOM (RGB / YBR): luminance
        arr = arr[..., :3].astype(np.float64) @ np.array([0.299, 0.587, 0.114])
        photometric = "MONOCHROME2"
    else:
        arr = apply_modality_lut(arr, ds)
        arr = apply_voi_lut(arr, ds)
    out = _stretch(arr)
    if photometric == "MONOCHROME1":
        out = 255 - out
    if notes is not None:
        notes.append(f"{what}: DICOM {photometric} read through its LUTs and stretched to 8 bit")
    return out


def read_grayscale(path: str | Path, *, max_pixels: Optional[int] = None, notes: Optional[list[str]] = None,
                   what: str = "image") -> np.ndarray:
    """Read an image file as H×W uint8 grayscale at its own size; `ImageReadError` naming the file if it
    cannot be used. `max_pixels` defaults to `MAX_PIXELS`; conversions are appended to `notes`."""
    path = Path(path)
    limit = MAX_PIXELS if max_pixels is None else int(max_pixels)
    if is_dicom(path):
        return _read_dicom(path, limit, notes, what)
    try:
        with warnings.catch_warnings():
            # PIL only warns between 1x and 2x its own limit; that is the case it guards against.
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                if im.width * im.height > limit:
                    raise ImageReadError(path, f"{im.width}x{im.height} pixels exceeds the limit of {limit} "
                                               "(decompression-bomb guard)")
                im.load()
                return to_uint8_gray(im, notes, what)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise ImageReadError(path, f"refused as a decompression bomb: {e}") from None
    except UnidentifiedImageError:
        raise ImageReadError(path, "not an image PIL can read (corrupt or unknown format)") from None
    except FileNotFoundError:
        raise ImageReadError(path, "no such file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise ImageReadError(path, f"corrupt or unreadable image: {e}") from None

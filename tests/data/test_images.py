"""One image reader for the shard builder and predict: 16-bit PNG by its stored bit depth (sBIT or
inferred), DICOM through pydicom, one pixel limit, and empty lung masks counted."""

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from PIL.PngImagePlugin import PngInfo

from mtlxray.data import images
from mtlxray.data.images import ImageReadError, read_grayscale
from mtlxray.data.shards import build_shards
from mtlxray.report import predict
from tiny_data import write_png

TRAIN = "Lung Segmentation Data/Lung Segmentation Data/Train"


def _gradient(h: int = 40, w: int = 30) -> np.ndarray:
    """An 8-bit image using the whole range 0..255."""
    arr = (np.arange(h * w).reshape(h, w) * 255 // (h * w - 1)).astype(np.uint8)
    arr[0, 0], arr[-1, -1] = 0, 255
    return arr


def _write_16bit(path, arr16: np.ndarray, sbit: int | None = None) -> None:
    info = PngInfo()
    if sbit is not None:
        info.add(b"sBIT", bytes([sbit]))  # PIL writes the chunk in its place, before IDAT
    Image.fromarray(arr16.astype(np.uint16)).save(path, pnginfo=info)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")  # really a 16-bit PNG
    assert images.png_significant_bits(path) == sbit


def _as_12_bit(img: np.ndarray) -> np.ndarray:
    """An 8-bit image as a detector's 12-bit data, unscaled in 16 bits (0..4095)."""
    return np.rint(img.astype(np.float64) * 4095 / 255).astype(np.uint16)


@pytest.mark.parametrize("sbit", [None, 12])
def test_12_bit_data_in_a_16_bit_png_reads_as_its_8_bit_rendering(tmp_path, sbit):
    img = _gradient()
    _write_16bit(tmp_path / "a12.png", _as_12_bit(img), sbit)
    notes: list[str] = []
    assert np.array_equal(read_grayscale(tmp_path / "a12.png", notes=notes), img)  # not near black
    if sbit is None:  # inferred from the pixels, and said
        assert notes == ["image: I;16 image has no sBIT chunk; its largest value 4095 fits 12 bits: read as "
                         "12-bit data (--input-range full reads all 16 bits)"]
    else:
        assert notes == ["image: I;16 image rescaled from 12 to 8 bit (sBIT 12)"]
    # the other ranges: all 16 bits (near black), and the image's own min..max
    assert read_grayscale(tmp_path / "a12.png", input_range="full").max() == 16
    assert np.array_equal(read_grayscale(tmp_path / "a12.png", input_range="minmax"), img)


def test_sbit_with_samples_scaled_to_16_bits_reads_the_16_bit_range(tmp_path):
    img = _gradient()  # the PNG standard's way: 12 significant bits, samples scaled to 16
    _write_16bit(tmp_path / "s.png", img.astype(np.uint16) * 257, sbit=12)
    assert np.array_equal(read_grayscale(tmp_path / "s.png"), img)


def test_an_inferred_bit_depth_is_logged_when_no_notes_are_kept(tmp_path, caplog):
    _write_16bit(tmp_path / "a12.png", _as_12_bit(_gradient()))
    with caplog.at_level("WARNING", logger="mtlxray.data.images"):
        predict.load_gray(tmp_path / "a12.png")
    assert "fits 12 bits: read as 12-bit data" in caplog.text


def test_an_8_bit_image_and_its_x257_16_bit_copy_read_identically(tmp_path):
    img = _gradient()
    write_png(tmp_path / "a8.png", img)
    _write_16bit(tmp_path / "a16.png", img.astype(np.uint16) * 257)
    notes: list[str] = []
    a8, a16 = read_grayscale(tmp_path / "a8.png"), read_grayscale(tmp_path / "a16.png", notes=notes)
    assert a16.dtype == np.uint8 and np.array_equal(a8, a16) and np.array_equal(a8, img)
    assert notes == ["image: I;16 image rescaled from 16 to 8 bit"]
    # predict reads through the same function (it used to clip a 16-bit image to white)
    assert np.array_equal(predict.load_gray(tmp_path / "a16.png"), img)


class _TinyNet(torch.nn.Module):
    """A fixed, deterministic model with the output dict predict expects."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(1, 2, 3, padding=1)
        self.cls = torch.nn.Linear(2, 3)

    def forward(self, x):
        maps = self.conv(x * 8 - 4)
        return {"lung": maps[:, :1], "inf": maps[:, 1:], "cls": self.cls(maps.mean((2, 3)))}


@pytest.mark.parametrize("bits", [16, 12])
def test_predict_gives_the_same_class_and_masks_for_an_8_bit_image_and_its_16_bit_copy(tmp_path, bits):
    img = _gradient(48, 48)
    write_png(tmp_path / "in" / "x8.png", img)
    _write_16bit(tmp_path / "in" / "x16.png", img.astype(np.uint16) * 257 if bits == 16 else _as_12_bit(img))
    records, failures = predict.predict_files(_TinyNet().eval(), 32, [tmp_path / "in" / "x8.png",
                                                                     tmp_path / "in" / "x16.png"], tmp_path / "out")
    assert not failures
    r8, r16 = records
    assert r8["probs"] == r16["probs"] and r8["predicted_class"] == r16["predicted_class"]
    for kind in ("lung", "inf"):
        m8 = np.asarray(Image.open(tmp_path / "out" / "masks" / f"x8_{kind}.png"))
        m16 = np.asarray(Image.open(tmp_path / "out" / "masks" / f"x16_{kind}.png"))
        assert np.array_equal(m8, m16)


def test_the_shard_builder_stores_16_and_12_bit_images_as_their_8_bit_originals(mini_qu_ex, tmp_path):
    path = mini_qu_ex / TRAIN / "Normal" / "images" / "Normal (1).png"
    original = np.asarray(Image.open(path))
    _write_16bit(path, original.astype(np.uint16) * 257)
    path12 = mini_qu_ex / TRAIN / "Normal" / "images" / "Normal (2).png"
    original12 = np.asarray(Image.open(path12))
    _write_16bit(path12, _as_12_bit(original12))
    build_shards(mini_qu_ex, tmp_path / "out", format="raw", image_size=32, workers=1, progress=False)
    with tarfile.open(next((tmp_path / "out" / "lung").glob("train-*.tar"))) as tar:
        stored = tar.extractfile("lung_train_Normal_Normal_1.img.raw").read()
        stored12 = tar.extractfile("lung_train_Normal_Normal_2.img.raw").read()
    assert np.array_equal(np.frombuffer(stored, np.uint8).reshape(32, 32), original)
    assert np.array_equal(np.frombuffer(stored12, np.uint8).reshape(32, 32), original12)
    notes = (tmp_path / "out" / "notes.jsonl").read_text()
    assert "I;16 image rescaled from 16 to 8 bit" in notes and "read as 12-bit data" in notes


def _write_dicom(path, stored: np.ndarray, photometric: str, slope: float = 2.0, intercept: float = -100.0,
                 window: tuple[float, float] | None = None) -> None:
    pydicom = pytest.importorskip("pydicom", reason="pydicom is in the dev extra")
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality = "DX"
    ds.Rows, ds.Columns = stored.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    if window is not None:
        ds.WindowCenter, ds.WindowWidth = window
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == stored.shape


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_goes_through_the_modality_lut_and_monochrome1_is_inverted(tmp_path, photometric):
    img = _gradient()
    stored = _as_12_bit(img)  # 12-bit detector values
    path = tmp_path / "x.dcm"
    _write_dicom(path, stored, photometric)
    want = img if photometric == "MONOCHROME2" else 255 - img  # white is bone either way
    got = read_grayscale(path)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    # Found without the suffix too, by the DICM marker
    path.rename(tmp_path / "x.img")
    assert np.array_equal(read_grayscale(tmp_path / "x.img"), want)
    assert np.array_equal(predict.load_gray(tmp_path / "x.img"), want)


def test_dicom_is_scaled_by_bits_stored_and_its_window_not_stretched(tmp_path):
    img = _gradient() // 2  # a dark image: 0..127 of 255
    _write_dicom(tmp_path / "dark.dcm", _as_12_bit(img), "MONOCHROME2")
    assert np.abs(read_grayscale(tmp_path / "dark.dcm").astype(int) - img).max() <= 1  # stays dark
    assert read_grayscale(tmp_path / "dark.dcm", input_range="minmax").max() == 255
    # a window over the lower half of the rescaled range (2*v-100): its top half is white
    _write_dicom(tmp_path / "win.dcm", _as_12_bit(_gradient()), "MONOCHROME2", window=(1000.0, 2000.0))
    got = read_grayscale(tmp_path / "win.dcm")
    assert got.min() == 0 and got.max() == 255 and (got == 255).mean() > 0.4


def test_dicom_over_the_pixel_limit_is_refused_before_its_pixels_are_read(tmp_path):
    path = tmp_path / "big.dcm"
    _write_dicom(path, np.zeros((50, 50), np.uint16), "MONOCHROME2")
    with pytest.raises(ImageReadError, match="50x50 pixels exceeds the limit of 1000"):
        read_grayscale(path, max_pixels=1000)


def test_one_pixel_limit_for_the_builder_and_predict(mini_qu_ex, tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 32 * 32 - 1)  # the mini tree's images are 32x32
    image = mini_qu_ex / TRAIN / "Normal" / "images" / "Normal (1).png"
    with pytest.raises(ImageReadError, match="32x32 pixels exceeds the limit of 1023"):
        predict.load_gray(image)
    manifest = build_shards(mini_qu_ex, tmp_path / "out", workers=1, progress=False, skip_bad=True)
    skipped = [json.loads(line) for line in (tmp_path / "out" / "skipped.jsonl").read_text().splitlines()]
    assert manifest["skipped"] == len(skipped) == 6
    assert all("exceeds the limit of 1023 (decompression-bomb guard)" in s["reason"] for s in skipped)
    assert manifest["params"]["max_pixels"] == 1023


def test_empty_lung_masks_are_counted_and_named(mini_qu_ex, tmp_path):
    mask = mini_qu_ex / TRAIN / "COVID-19" / "lung masks" / "covid_2.png"
    write_png(mask, np.zeros((32, 32), np.uint8))
    manifest = build_shards(mini_qu_ex, tmp_path / "out", workers=1, progress=False, image_size=32)
    assert manifest["empty_lung_masks"] == 1 and manifest["converted"] == 0
    notes = [json.loads(line) for line in (tmp_path / "out" / "notes.jsonl").read_text().splitlines()]
    assert notes == [{"path": str(mini_qu_ex / TRAIN / "COVID-19" / "images" / "covid_2.png"),
                      "note": "lung mask is empty"}]

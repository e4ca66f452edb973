"""One image reader for the shard builder and predict: 16-bit PNG by its range, DICOM through pydicom,
one pixel limit, and empty lung masks counted."""

import json
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image

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


def _write_16bit(path, arr16: np.ndarray) -> None:
    Image.fromarray(arr16.astype(np.uint16)).save(path)
    with Image.open(path) as im:
        assert im.mode.startswith("I;16")  # really a 16-bit PNG


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


def test_predict_gives_the_same_class_and_masks_for_an_8_bit_image_and_its_16_bit_copy(tmp_path):
    img = _gradient(48, 48)
    write_png(tmp_path / "in" / "x8.png", img)
    _write_16bit(tmp_path / "in" / "x16.png", img.astype(np.uint16) * 257)
    records, failures = predict.predict_files(_TinyNet().eval(), 32, [tmp_path / "in" / "x8.png",
                                                                     tmp_path / "in" / "x16.png"], tmp_path / "out")
    assert not failures
    r8, r16 = records
    assert r8["probs"] == r16["probs"] and r8["predicted_class"] == r16["predicted_class"]
    for kind in ("lung", "inf"):
        m8 = np.asarray(Image.open(tmp_path / "out" / "masks" / f"x8_{kind}.png"))
        m16 = np.asarray(Image.open(tmp_path / "out" / "masks" / f"x16_{kind}.png"))
        assert np.array_equal(m8, m16)


def test_the_shard_builder_stores_a_16_bit_image_as_its_8_bit_original(mini_qu_ex, tmp_path):
    path = mini_qu_ex / TRAIN / "Normal" / "images" / "Normal (1).png"
    original = np.asarray(Image.open(path))
    _write_16bit(path, original.astype(np.uint16) * 257)
    build_shards(mini_qu_ex, tmp_path / "out", format="raw", image_size=32, workers=1, progress=False)
    with tarfile.open(next((tmp_path / "out" / "lung").glob("train-*.tar"))) as tar:
        stored = tar.extractfile("lung_train_Normal_Normal_1.img.raw").read()
    assert np.array_equal(np.frombuffer(stored, np.uint8).reshape(32, 32), original)
    assert "I;16 image rescaled from 16 to 8 bit" in (tmp_path / "out" / "notes.jsonl").read_text()


def _write_dicom(path, stored: np.ndarray, photometric: str, slope: float = 2.0, intercept: float = -100.0) -> None:
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
    ds.PixelData = stored.astype("<u2").tobytes()
    ds.save_as(path, enforce_file_format=True)
    assert pydicom.dcmread(path).pixel_array.shape == stored.shape


@pytest.mark.parametrize("photometric", ["MONOCHROME2", "MONOCHROME1"])
def test_dicom_goes_through_the_modality_lut_and_monochrome1_is_inverted(tmp_path, photometric):
    img = _gradient()
    stored = img.astype(np.uint16) * 16  # 12-bit detector values
    path = tmp_path / "x.dcm"
    _write_dicom(path, stored, photometric)
    want = img if photometric == "MONOCHROME2" else 255 - img  # white is bone either way
    got = read_grayscale(path)
    assert got.dtype == np.uint8 and np.array_equal(got, want)
    # Found without the suffix too, by the DICM marker
    path.rename(tmp_path / "x.img")
    assert np.array_equal(read_grayscale(tmp_path / "x.img"), want)
    assert np.array_equal(predict.load_gray(tmp_path / "x.img"), want)


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

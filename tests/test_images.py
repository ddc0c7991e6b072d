"""Image IO on pydicom's own bundled scanner files, and on PNGs we write."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.pixels import apply_modality_lut

from data.images import ImageReadError, read_image, to_display

# Addressed by path, never through get_testdata_file: that tries to download files not bundled.
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"


def test_ct_keeps_hounsfield_units_from_the_modality_lut():
    image = read_image(TEST_FILES / "CT_small.dcm")
    dataset = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    expected = apply_modality_lut(dataset.pixel_array, dataset)
    assert image.pixels.dtype == np.float32 and image.modality == "CT"
    assert np.array_equal(image.pixels, expected.astype(np.float32))
    assert image.pixels[0, 0] == pytest.approx(float(dataset.pixel_array[0, 0]) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept))
    shown = to_display(image)  # soft-tissue preset: not collapsed to a few grey levels
    assert 0.0 <= shown.min() and shown.max() <= 1.0 and len(np.unique(shown)) > 50


def test_mr_uses_its_own_window_and_rle_decodes_to_the_same_pixels():
    plain = read_image(TEST_FILES / "MR_small.dcm")
    rle = read_image(TEST_FILES / "MR_small_RLE.dcm")
    assert plain.window == (600.0, 1600.0)
    assert np.array_equal(plain.pixels, rle.pixels)


def test_truncated_dicom_names_the_file():
    with pytest.raises(ImageReadError, match="MR_truncated.dcm"):
        read_image(TEST_FILES / "MR_truncated.dcm")


def test_sixteen_bit_png_keeps_its_values_and_missing_files_are_named(tmp_path):
    values = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) * 15)
    Image.fromarray(values).save(tmp_path / "deep.png")
    image = read_image(tmp_path / "deep.png")
    assert image.pixels.max() == float(values.max()) > 255
    with pytest.raises(ImageReadError, match="nope.png: file not found"):
        read_image(tmp_path / "nope.png")
    (tmp_path / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ImageReadError, match="broken.png: not a readable image"):
        read_image(tmp_path / "broken.png")

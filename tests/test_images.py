"""Image IO on pydicom's own bundled scanner files, and on PNG and DICOM files we write."""

from pathlib import Path

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.pixels import apply_modality_lut, get_decoder
from pydicom.uid import JPEG2000Lossless

from data.images import ImageReadError, read_image, to_display, write_png, write_secondary_capture

# Addressed by path, never through get_testdata_file: that tries to download files not bundled.
TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
LUMA = np.array([0.299, 0.587, 0.114])


def test_ct_keeps_hounsfield_units_from_the_modality_lut():
    image = read_image(TEST_FILES / "CT_small.dcm")
    dataset = pydicom.dcmread(TEST_FILES / "CT_small.dcm")
    expected = apply_modality_lut(dataset.pixel_array, dataset)
    assert image.pixels.dtype == np.float32 and image.modality == "CT"
    assert np.array_equal(image.pixels, expected.astype(np.float32))
    assert image.pixels[0, 0] == pytest.approx(float(dataset.pixel_array[0, 0]) * float(dataset.RescaleSlope) + float(dataset.RescaleIntercept))
    shown = to_display(image)  # soft-tissue preset: not collapsed to a few grey levels
    assert 0.0 <= shown.min() and shown.max() <= 1.0 and len(np.unique(shown)) > 50


@pytest.mark.parametrize("name", ["MR_small_RLE.dcm", "MR_small_jpeg_ls_lossless.dcm", "MR_small_jp2klossless.dcm"])
def test_lossless_compressed_mr_decodes_to_the_uncompressed_pixels(name):
    plain = read_image(TEST_FILES / "MR_small.dcm")
    compressed = read_image(TEST_FILES / name)
    assert plain.window == compressed.window == (600.0, 1600.0)
    assert np.array_equal(plain.pixels, compressed.pixels)
    assert (plain.pixels.min(), plain.pixels.max()) == (127.0, 2145.0)


@pytest.mark.filterwarnings("ignore:Expected explicit VR")  # the dcmtk copy's header is sloppy
def test_lossy_jpeg_matches_dcmtks_decompression_of_the_same_file():
    jpeg = read_image(TEST_FILES / "SC_rgb_jpeg.dcm")  # JPEG Baseline, decoded by pylibjpeg
    rgb = pydicom.dcmread(TEST_FILES / "SC_rgb_jpeg_dcmd.dcm").pixel_array  # decompressed by dcmtk
    assert np.abs(jpeg.pixels - rgb @ LUMA).max() <= 1.0  # IDCT rounding: at most one level
    assert jpeg.pixels.shape == (256, 256) and jpeg.window is None


def test_ybr_and_palette_colour_come_out_as_luminance():
    stripes = read_image(TEST_FILES / "SC_rgb_rle.dcm")  # lossless RGB colour bars
    ybr = read_image(TEST_FILES / "SC_ybr_full_422_uncompressed.dcm")  # the same bars, YBR 4:2:2
    assert stripes.pixels[0, 0] == pytest.approx(0.299 * 255)  # pure red
    assert np.abs(ybr.pixels - stripes.pixels).max() < 2.0  # chroma subsampling and YBR rounding
    palette = read_image(TEST_FILES / "examples_palette.dcm")
    dataset = pydicom.dcmread(TEST_FILES / "examples_palette.dcm")
    tables = [np.frombuffer(dataset[f"{colour}PaletteColorLookupTableData"].value, "<u2") for colour in ("Red", "Green", "Blue")]
    expected = np.stack([table[dataset.pixel_array] for table in tables], axis=-1) @ LUMA  # 16-bit entries
    assert palette.pixels.shape == (350, 800)
    np.testing.assert_allclose(palette.pixels, expected, rtol=1e-5)
    assert len(np.unique(palette.pixels)) > 100


def test_undecodable_or_truncated_dicom_gives_one_line_naming_file_and_syntax():
    with pytest.raises(ImageReadError) as caught:
        read_image(TEST_FILES / "JPEG-lossy.dcm")  # non-conformant JPEG that no plugin decodes
    message = str(caught.value)
    assert "\n" not in message and "JPEG-lossy.dcm: cannot decode JPEG Extended (Process 2 and 4)" in message
    assert "pylibjpeg: libjpeg error" in message
    with pytest.raises(ImageReadError, match="MR_truncated.dcm: cannot decode Explicit VR Little Endian .* less than expected"):
        read_image(TEST_FILES / "MR_truncated.dcm")


def test_missing_decoder_plugin_says_what_to_install(monkeypatch):
    monkeypatch.setattr(get_decoder(JPEG2000Lossless), "_available", {})  # as if no plugin were installed
    with pytest.raises(ImageReadError) as caught:
        read_image(TEST_FILES / "MR_small_jp2klossless.dcm")
    assert str(caught.value).endswith(
        "MR_small_jp2klossless.dcm: cannot decode JPEG 2000 Image Compression (Lossless Only) pixel data: "
        "no decoder plugin is installed for it; pip install pylibjpeg pylibjpeg-openjpeg"
    )


def _stored_sc(tmp_path, stored: list[list[int]]) -> Path:
    """A Secondary Capture whose 12-bit stored values are exactly ``stored``."""
    return write_secondary_capture(tmp_path / "sc.dcm", np.array(stored) / 4095, prompt="p", model_version="m")


def test_voi_lut_after_the_modality_lut_with_pixels_left_in_original_units(tmp_path):
    path = _stored_sc(tmp_path, [[50, 100, 101], [102, 4000, 0]])
    dataset = pydicom.dcmread(path)
    dataset.RescaleIntercept = 10  # modality LUT output: stored + 10
    item = Dataset()
    item.LUTDescriptor = [3, 110, 16]  # three entries, the first for input 110, 16-bit output
    item.add_new("LUTData", "OW", np.array([0, 13107, 26214], "<u2").tobytes())  # OW: raw words
    dataset.VOILUTSequence = [item]
    dataset.save_as(path)
    image = read_image(path)
    assert np.array_equal(image.pixels, [[60, 110, 111], [112, 4010, 10]])
    # Below 110 -> first entry, 110..112 -> entries, above -> last; output / (2**16 - 1).
    np.testing.assert_allclose(to_display(image), [[0, 0, 0.2], [0.4, 0.4, 0]], atol=1e-7)
    # An explicit window wins: (112.5, 4) spans 110.5 .. 113.5 by DICOM's linear formula.
    np.testing.assert_allclose(to_display(image, (112.5, 4)), [[0, 0, 1 / 6], [0.5, 1, 0]], atol=1e-7)


def test_monochrome1_keeps_stored_values_and_inverts_after_the_window(tmp_path):
    path = _stored_sc(tmp_path, [[0, 1000], [2048, 4095]])
    dataset = pydicom.dcmread(path)
    dataset.PhotometricInterpretation = "MONOCHROME1"
    dataset.save_as(path)
    image = read_image(path)
    assert np.array_equal(image.pixels, [[0, 1000], [2048, 4095]])
    np.testing.assert_allclose(to_display(image), 1 - np.array([[0, 1000], [2048, 4095]]) / 4095, atol=1e-6)


def test_secondary_capture_carries_provenance_and_round_trips(tmp_path):
    pixels = np.random.default_rng(0).uniform(size=(40, 30))
    pixels[0, :3] = [0.0, 0.5, 1.0]
    prompt = "CT: liver lesion — hypodense, 2 cm"
    patient = {"PatientName": "DOE^JANE", "PatientID": "123", "PatientBirthDate": "19700101", "InstitutionName": "Demo"}
    path = write_secondary_capture(
        tmp_path / "new" / "sc.dcm", pixels, prompt=prompt, model_version="sd-med v3", modality="CT", patient=patient
    )
    assert path == tmp_path / "new" / "sc.dcm"
    dataset = pydicom.dcmread(path)
    assert dataset.SOPClassUID == dataset.file_meta.MediaStorageSOPClassUID == "1.2.840.10008.5.1.4.1.1.7"
    assert dataset.SOPInstanceUID == dataset.file_meta.MediaStorageSOPInstanceUID
    assert len({dataset.SOPInstanceUID, dataset.StudyInstanceUID, dataset.SeriesInstanceUID}) == 3
    assert dataset.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.1" and dataset.preamble == b"\0" * 128
    assert dataset.ImageComments == prompt and dataset.SoftwareVersions == "sd-med v3"
    assert dataset.DerivationDescription == f"generated by sd-med v3 from prompt: {prompt}"
    assert (dataset.ConversionType, dataset.BurnedInAnnotation, dataset.Modality) == ("WSD", "NO", "CT")
    assert dataset.SeriesDescription == "Generated CT image (synthetic, not acquired)"
    assert (dataset.BitsAllocated, dataset.BitsStored, dataset.HighBit, dataset.PixelRepresentation) == (16, 12, 11, 0)
    assert {k: str(dataset.data_element(k).value) for k in patient} == patient
    assert list(dataset.pixel_array[0, :3]) == [0, 2048, 4095]  # rint(0.5 * 4095) = 2048 (half to even)
    shown = to_display(read_image(path))
    assert np.abs(shown - pixels).max() <= 0.5 / 4095 + 1e-7


def test_secondary_capture_defaults_and_refusals(tmp_path):
    dataset = pydicom.dcmread(write_secondary_capture(tmp_path / "a.dcm", np.zeros((4, 4)), prompt="p", model_version="m"))
    assert dataset.PatientName == "" and dataset.PatientID == "" and "PatientName" in dataset
    assert dataset.Modality == "OT"
    with pytest.raises(ValueError, match="'Nickname' is not a DICOM keyword"):
        write_secondary_capture(tmp_path / "b.dcm", np.zeros((4, 4)), prompt="p", model_version="m", patient={"Nickname": "Jo"})
    for bad, why in [(np.zeros((2, 4, 4)), "2-D"), (np.full((4, 4), np.nan), "NaN"), (np.full((4, 4), 1.5), r"\[0, 1\]")]:
        with pytest.raises(ValueError, match=why):
            write_secondary_capture(tmp_path / "c.dcm", bad, prompt="p", model_version="m")
        with pytest.raises(ValueError, match=why):
            write_png(tmp_path / "c.png", bad)
    assert not (tmp_path / "b.dcm").exists() and not (tmp_path / "c.dcm").exists()


@pytest.mark.parametrize("bits, mode", [(8, "L"), (16, "I;16")])
def test_png_round_trips_at_8_and_16_bits(tmp_path, bits, mode):
    pixels = np.random.default_rng(1).uniform(size=(32, 24))
    pixels[0, :3] = [0.0, 0.5, 1.0]
    path = write_png(tmp_path / "deeper" / "g.png", pixels, bits=bits)
    top = 2**bits - 1
    with Image.open(path) as written:
        assert written.mode == mode
    stored = read_image(path).pixels
    assert list(stored[0, :3]) == [0, np.rint(0.5 * top), top]  # 128 and 32768
    assert np.abs(stored / top - pixels).max() <= 0.5 / top + 1e-6  # float32 division
    with pytest.raises(ValueError, match="bits must be 8 or 16"):
        write_png(tmp_path / "x.png", pixels, bits=12)


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

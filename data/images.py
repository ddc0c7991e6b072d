"""Read medical images into float arrays, keeping their original values until display; write ours.

The earlier selector windowed DICOM and cast it to uint8 at once, collapsing images to 0/1. Here
every reader returns float32 in the file's own units (Hounsfield units for CT after the modality
LUT), and ``to_display`` maps to [0, 1] only at the end, in the order DICOM prescribes: modality
LUT, then VOI LUT or window (or a preset), then MONOCHROME1 inversion.

- PNG / JPEG / TIFF, 8- or 16-bit: read as float32 in their stored values (RGB converted to gray).
- DICOM, through pydicom: modality LUT (RescaleSlope / RescaleIntercept) into ``pixels``; the file's
  VOI LUT and window are kept beside them for ``to_display``. Multi-frame files give their middle
  frame (a documented choice: a single representative slice). RGB, YBR (which pydicom decodes to
  RGB) and PALETTE COLOR (through the file's palette) are converted to gray. Compressed transfer
  syntaxes (JPEG, JPEG-LS, JPEG 2000, RLE) decode through pydicom's plugins, the pylibjpeg packages
  in requirements.txt; a file that still cannot be decoded, or is truncated, raises
  ``ImageReadError``: one line naming the file, the transfer syntax and why.

Generated images are written as 8- or 16-bit PNG, or as DICOM Secondary Capture carrying the
prompt and the model version, so that an archive can tell them from acquired images.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import numpy as np
import pydicom
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.datadict import tag_for_keyword
from pydicom.multival import MultiValue
from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, get_decoder
from pydicom.pixels.decoders.pylibjpeg import DECODER_DEPENDENCIES
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

#: Window presets (centre, width) in Hounsfield units, for CT files that carry no window.
CT_WINDOWS = {"soft tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}

#: ITU-R BT.601 luma weights, as PIL's "L" conversion uses: colour files become gray like PNGs do.
_LUMA = np.array([0.299, 0.587, 0.114], np.float32)


def rgb_to_gray(rgb: np.ndarray) -> np.ndarray:
    """(..., 3 or 4) colour values to float32 grey with the ITU-R 601 weights (alpha ignored)."""
    return rgb[..., :3].astype(np.float32) @ _LUMA

#: Secondary Capture stores 12-bit values (0..4095) in 16-bit words, the usual depth of CT and MR.
_SC_LEVELS = 4095


class ImageReadError(ValueError):
    """An image file that is missing, truncated, or in a form that cannot be decoded here."""


@dataclass
class MedicalImage:
    pixels: np.ndarray  # float32 (H, W), original units (HU for CT after the modality LUT)
    window: tuple[float, float] | None  # (centre, width) from the file, if it has one
    modality: str | None  # the DICOM Modality tag (CT, MR, OT ...), None for PNG/JPEG
    source: Path
    voi_lut: Dataset | None = None  # the file's VOI LUT Sequence, for pydicom's apply_voi_lut
    monochrome1: bool = False  # low values are bright: to_display inverts after the VOI


def read_image(path: str | Path) -> MedicalImage:
    """Read a PNG, JPEG, TIFF or DICOM file as float pixels, or raise ``ImageReadError``."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: file not found")
    with open(path, "rb") as handle:
        header = handle.read(132)
    if header[128:132] == b"DICM" or path.suffix.lower() in (".dcm", ".dicom"):
        return _read_dicom(path)
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("RGB", "RGBA", "P", "LA", "CMYK"):
                image = image.convert("L")
            pixels = np.asarray(image, dtype=np.float32)
    except (OSError, SyntaxError) as error:
        raise ImageReadError(f"{path}: not a readable image ({error})") from error
    return MedicalImage(pixels, None, None, path)


def _read_dicom(path: Path) -> MedicalImage:
    dataset = None
    try:
        dataset = pydicom.dcmread(path)
        raw = dataset.pixel_array  # YBR comes back as RGB: pydicom converts by default
    except Exception as error:  # pydicom raises many kinds; all mean "cannot decode this file"
        raise _decode_error(path, dataset, error) from error
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    if frames > 1:
        raw = raw[frames // 2]  # one representative slice: the middle frame
    modality = dataset.get("Modality")
    photometric = dataset.get("PhotometricInterpretation")
    if photometric == "PALETTE COLOR":
        raw = apply_color_lut(raw, dataset)  # palette indices to RGB through the file's tables
    if raw.ndim == 3:  # colour: gray in the stored units; windows and VOI LUTs are for monochrome
        return MedicalImage(rgb_to_gray(raw), None, modality, path)
    pixels = np.asarray(apply_modality_lut(raw, dataset), dtype=np.float32)
    return MedicalImage(pixels, _file_window(dataset), modality, path, _voi_lut(dataset), photometric == "MONOCHROME1")


def _decode_error(path: Path, dataset: Dataset | None, error: Exception) -> ImageReadError:
    """One line naming the file, the transfer syntax and why; pydicom's plugin reports span lines."""
    why = re.sub(r":?\s*\n\s*", "; ", str(error).strip())
    syntax = dataset.file_meta.get("TransferSyntaxUID") if dataset is not None else None
    if syntax is None:
        return ImageReadError(f"{path}: {why}")
    if syntax in DECODER_DEPENDENCIES and not get_decoder(syntax).available_plugins:
        packages = " ".join(dependency.partition(">=")[0] for dependency in DECODER_DEPENDENCIES[syntax])
        why = f"no decoder plugin is installed for it; pip install {packages}"
    return ImageReadError(f"{path}: cannot decode {syntax.name} pixel data: {why}")


def _file_window(dataset: Dataset) -> tuple[float, float] | None:
    """The file's first VOI window (a file may list several; the first is the default view)."""
    centre, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if centre is None or width is None:
        return None
    first = [float(v[0]) if isinstance(v, MultiValue) else float(v) for v in (centre, width)]
    return first[0], first[1]


def _voi_lut(dataset: Dataset) -> Dataset | None:
    """The file's VOI LUT Sequence alone, with the file meta that says how its LUT Data is encoded.

    A small dataset of its own, so the image does not carry the whole header (patient tags
    included) only to be displayed later.
    """
    if not dataset.get("VOILUTSequence"):
        return None
    module = Dataset()
    module.file_meta = dataset.file_meta
    module.VOILUTSequence = dataset.VOILUTSequence
    return module


def to_display(image: MedicalImage, window: str | tuple[float, float] | None = None) -> np.ndarray:
    """Map to [0, 1] for display or a network.

    The given window or preset wins; otherwise the file's VOI LUT, the file's window, the soft-tissue
    preset for CT, or min-max. MONOCHROME1 is inverted last, as DICOM's presentation step does.
    """
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown window preset {window!r}; expected one of {', '.join(CT_WINDOWS)}")
        window = CT_WINDOWS[window]
    if window is None and image.voi_lut is not None:
        shown = _apply_voi_lut(image.pixels, image.voi_lut)
    else:
        preset = CT_WINDOWS["soft tissue"] if image.modality == "CT" else None
        shown = _apply_window(image.pixels, window or image.window or preset)
    return 1.0 - shown if image.monochrome1 else shown


def _apply_voi_lut(pixels: np.ndarray, voi_lut: Dataset) -> np.ndarray:
    """The first VOI LUT, its output range 0 .. 2**bits - 1 (the LUT Descriptor's third value) to [0, 1].

    The LUT is indexed by integer modality-LUT outputs, hence the rounding.
    """
    bits = int(voi_lut.VOILUTSequence[0].LUTDescriptor[2])
    shown = apply_voi_lut(np.rint(pixels).astype(np.int32), voi_lut)
    return (shown / (2**bits - 1)).astype(np.float32)


def _apply_window(pixels: np.ndarray, window: tuple[float, float] | None) -> np.ndarray:
    """DICOM's linear window (PS3.3 C.11.2.1.2.1) to [0, 1], or min-max when there is no window.

    A window (c, w) maps c - 0.5 - (w - 1) / 2 to 0 and c - 0.5 + (w - 1) / 2 to 1, so a viewer and
    this function agree on every file, ours included.
    """
    if window is None:
        low, high = float(pixels.min()), float(pixels.max())
    else:
        centre, width = window
        low = centre - 0.5 - (width - 1) / 2
        high = low + width - 1
    if high <= low:  # a constant image, or a width-1 window: a threshold
        return (pixels > high).astype(np.float32)
    return np.clip((pixels - low) / (high - low), 0.0, 1.0).astype(np.float32)


def _unit_image(pixels01: np.ndarray) -> np.ndarray:
    """The pixels as float64, after checking they are what the writers expect: 2-D, finite, in [0, 1]."""
    pixels = np.asarray(pixels01, dtype=np.float64)
    if pixels.ndim != 2 or pixels.size == 0:
        raise ValueError(f"pixels01 must be a non-empty 2-D gray image, got shape {pixels.shape}")
    if not np.isfinite(pixels).all():
        raise ValueError("pixels01 holds NaN or infinite values")
    if pixels.min() < 0.0 or pixels.max() > 1.0:
        raise ValueError(f"pixels01 must lie in [0, 1], got [{pixels.min():g}, {pixels.max():g}]")
    return pixels


def write_png(path: str | Path, pixels01: np.ndarray, bits: int = 8) -> Path:
    """Save [0, 1] pixels as an 8- or 16-bit grayscale PNG (16 keeps fine steps 8 would band)."""
    if bits not in (8, 16):
        raise ValueError(f"bits must be 8 or 16, got {bits}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unit_to_pil(pixels01, bits).save(path)
    return path


def unit_to_pil(pixels01: np.ndarray, bits: int = 8) -> Image.Image:
    """[0, 1] pixels as an 8- or 16-bit grey PIL image (what an expert sees, what a VAE encodes)."""
    return Image.fromarray(np.rint(_unit_image(pixels01) * (2**bits - 1)).astype(np.uint8 if bits == 8 else np.uint16))


def write_secondary_capture(
    path: str | Path,
    pixels01: np.ndarray,
    *,
    prompt: str,
    model_version: str,
    modality: str = "OT",
    patient: dict[str, object] | None = None,
) -> Path:
    """Save [0, 1] pixels as a DICOM Secondary Capture that says it was generated, by what, from what.

    12-bit values under a window that spans them, so ``read_image`` then ``to_display`` gives the
    pixels back within 1/4095. ``patient`` maps DICOM keywords to values (PatientName, PatientID,
    InstitutionName ...), written last, over the empty defaults: the demo set uses it for fake
    patients that the de-identification tests must find. An unknown keyword is a ``ValueError``.
    """
    stored = np.rint(_unit_image(pixels01) * _SC_LEVELS).astype("<u2")
    for keyword in patient or {}:
        if tag_for_keyword(keyword) is None:
            raise ValueError(f"patient: {keyword!r} is not a DICOM keyword")
    now = datetime.now()
    date, time = now.strftime("%Y%m%d"), now.strftime("%H%M%S")
    dataset = Dataset()
    dataset.file_meta = FileMetaDataset()
    dataset.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    dataset.file_meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    dataset.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    dataset.update({
        "SpecificCharacterSet": "ISO_IR 192",  # UTF-8: a prompt may hold any character
        "SOPClassUID": SecondaryCaptureImageStorage,
        "SOPInstanceUID": dataset.file_meta.MediaStorageSOPInstanceUID,
        # Patient and study: type 2, present and empty unless ``patient`` fills them.
        "PatientName": "", "PatientID": "", "PatientBirthDate": "", "PatientSex": "",
        "StudyInstanceUID": generate_uid(), "StudyDate": date, "StudyTime": time, "StudyID": "",
        "AccessionNumber": "", "ReferringPhysicianName": "",
        "SeriesInstanceUID": generate_uid(), "SeriesNumber": 1, "Modality": modality,
        "SeriesDescription": f"Generated {modality} image (synthetic, not acquired)",
        "ConversionType": "WSD", "SoftwareVersions": model_version, "Manufacturer": "",
        "InstanceNumber": 1, "ImageType": ["DERIVED", "SECONDARY"], "PatientOrientation": "",
        "ContentDate": date, "ContentTime": time, "BurnedInAnnotation": "NO",
        "ImageComments": prompt,
        "DerivationDescription": f"generated by {model_version} from prompt: {prompt}"[:1024],
        # Image pixels: 12 bits in 16, identity modality LUT, a window spanning 0..4095.
        "SamplesPerPixel": 1, "PhotometricInterpretation": "MONOCHROME2",
        "Rows": stored.shape[0], "Columns": stored.shape[1],
        "BitsAllocated": 16, "BitsStored": 12, "HighBit": 11, "PixelRepresentation": 0,
        "RescaleSlope": 1, "RescaleIntercept": 0, "RescaleType": "US",
        "WindowCenter": (_SC_LEVELS + 1) // 2, "WindowWidth": _SC_LEVELS + 1,
    })
    dataset.update(patient or {})
    dataset.PixelData = stored.tobytes()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    dataset.save_as(path, enforce_file_format=True)
    return path

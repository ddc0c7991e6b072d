"""Read medical images into float arrays, keeping their original values until display.

The earlier selector windowed DICOM and cast it to uint8 at once, collapsing images to 0/1. Here
every reader returns float32 in the file's own units (Hounsfield units for CT after the modality
LUT), and ``to_display`` maps to [0, 1] only at the end, through the file's window or a preset.

- PNG / JPEG / TIFF, 8- or 16-bit: read as float32 in their stored values (RGB converted to gray).
- DICOM, through pydicom: modality LUT (RescaleSlope / RescaleIntercept), the VOI window from the
  file, or a per-modality preset; MONOCHROME1 inverted so bright means dense; multi-frame files
  give their middle frame (a documented choice: a single representative slice); RGB converted to
  gray. Compressed transfer syntaxes decode through pydicom's handlers and the installed plugins;
  a file that still cannot be decoded, or is truncated, raises ``ImageReadError`` naming the file.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

#: Window presets (centre, width) in Hounsfield units, for CT files that carry no window.
CT_WINDOWS = {"soft tissue": (40.0, 400.0), "lung": (-600.0, 1500.0), "bone": (400.0, 1800.0)}


class ImageReadError(ValueError):
    """An image file that is missing, truncated, or in a form that cannot be decoded here."""


@dataclass
class MedicalImage:
    pixels: np.ndarray  # float32 (H, W), original units (HU for CT after the modality LUT)
    window: tuple[float, float] | None  # (centre, width) from the file, if it has one
    modality: str | None  # the DICOM Modality tag (CT, MR, OT ...), None for PNG/JPEG
    source: Path


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
    import pydicom
    from pydicom.pixels import apply_modality_lut

    dataset = None
    try:
        dataset = pydicom.dcmread(path)
        raw = dataset.pixel_array
    except Exception as error:  # pydicom raises many kinds; all mean "cannot decode this file"
        syntax = getattr(getattr(dataset, "file_meta", None), "TransferSyntaxUID", None)
        why = f"pixel data in {syntax.name} cannot be decoded: {error}" if syntax is not None else str(error)
        raise ImageReadError(f"{path}: {why}") from error
    frames = int(dataset.get("NumberOfFrames", 1) or 1)
    samples = int(dataset.get("SamplesPerPixel", 1))
    if frames > 1:
        raw = raw[frames // 2]  # one representative slice: the middle frame
    if samples == 3:
        pixels = raw[..., :3].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)
    else:
        pixels = np.asarray(apply_modality_lut(raw, dataset), dtype=np.float32)
        if dataset.get("PhotometricInterpretation") == "MONOCHROME1":
            pixels = pixels.max() + pixels.min() - pixels  # bright means dense, as in MONOCHROME2
    return MedicalImage(pixels, _file_window(dataset), dataset.get("Modality"), path)


def _file_window(dataset) -> tuple[float, float] | None:
    """The file's first VOI window (a file may list several; the first is the default view)."""
    from pydicom.multival import MultiValue

    centre, width = dataset.get("WindowCenter"), dataset.get("WindowWidth")
    if centre is None or width is None:
        return None
    first = [float(v[0]) if isinstance(v, MultiValue) else float(v) for v in (centre, width)]
    return first[0], first[1]


def to_display(image: MedicalImage, window: str | tuple[float, float] | None = None) -> np.ndarray:
    """Map to [0, 1] for display or a network: the given window, the file's, a CT preset, or min-max."""
    if isinstance(window, str):
        if window not in CT_WINDOWS:
            raise ValueError(f"unknown window preset {window!r}; expected one of {', '.join(CT_WINDOWS)}")
        window = CT_WINDOWS[window]
    window = window or image.window or (CT_WINDOWS["soft tissue"] if image.modality == "CT" else None)
    pixels = image.pixels
    if window is None:
        low, high = float(pixels.min()), float(pixels.max())
    else:
        centre, width = window
        low, high = centre - width / 2, centre + width / 2
    if high <= low:
        return np.zeros_like(pixels)
    return np.clip((pixels - low) / (high - low), 0.0, 1.0).astype(np.float32)

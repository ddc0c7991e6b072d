"""The demo ratings set: phantom images, degraded on purpose, rated by simulated experts.

``python -m data.demo_set --out data/demo`` writes ``medical_ratings.csv`` (the five-column ratings
format of ``data.ratings``) and its images, half as PNG and half as DICOM Secondary Capture carrying
FAKE patient tags (names, IDs, birth dates, institution) for the de-identification work.

How each image is made: a phantom of a random modality, then one degradation, chosen at random:

=================  ======================================================  =====================
degradation        what is done (severity s drawn uniformly in [0, 1])      true quality q
=================  ======================================================  =====================
none               the phantom as drawn                                     1
noise              Gaussian noise, std 0.02 + 0.25 s                        1 - s
blur               Gaussian blur, std 0.4 + 2.6 s pixels                    1 - s
streaks            bright radial streaks from a point (metal artifact),     1 - s
                   amplitude 0.06 + 0.5 s
motion             ghost copies shifted along one axis (patient motion),    1 - s
                   amplitude 0.08 + 0.5 s
bad window         contrast squeezed toward mid-grey, or a window so         1 - s
                   narrow that much of the image clips to black and white
blank              a constant grey field with faint noise                   0
wrong modality     a clean image of another modality under this prompt      0
=================  ======================================================  =====================

The rating rule: an expert of level L rates ``round(1 + 2 q + e)``, clipped to 1-3, where the error
``e`` is Gaussian with std 0.45, 0.3 and 0.15 for levels 1, 2 and 3: senior experts are steadier.
Every image is rated by one of five experts, and a third of them by a second expert too, so the
CSV has more rows than images. The CSV's ``modality`` column is the modality the image shows (the
expert sees it); for a wrong-modality image it differs from the prompt's.
"""

from __future__ import annotations

import argparse
import random
from pathlib import Path

import numpy as np
from scipy import ndimage

from data.images import write_png, write_secondary_capture
from data.modalities import DICOM_MODALITY, MODALITIES
from data.phantoms import make_phantom, random_phantom
from data.ratings import write_ratings

DEGRADATIONS = ("none", "noise", "blur", "streaks", "motion", "bad window", "blank", "wrong modality")
#: How often each degradation is drawn; clean images are the most common, as in a real archive.
DEGRADATION_WEIGHTS = (0.30, 0.12, 0.12, 0.09, 0.09, 0.12, 0.08, 0.08)

#: (name, level) of the simulated experts.
EXPERTS = (("alice", 3), ("bob", 2), ("carol", 1), ("dan", 2), ("erin", 3))
RATING_NOISE = {1: 0.45, 2: 0.3, 3: 0.15}
SECOND_OPINION_RATE = 1 / 3
FAKE_SURNAMES = ("DOE", "ROE", "MUSTERMANN", "DUPONT", "ROSSI", "TANAKA", "SILVA", "NOWAK")
FAKE_GIVEN = ("JANE", "JOHN", "ALEX", "SAM", "KIM", "LEE", "MARIA", "NOOR")


def degrade(image: np.ndarray, kind: str, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Apply one degradation of the table above to a [0, 1] image; returns a new [0, 1] image."""
    size = image.shape[0]
    if kind == "none" or kind == "wrong modality":
        out = image.copy()
    elif kind == "noise":
        out = image + rng.normal(0.0, 0.02 + 0.25 * severity, image.shape)
    elif kind == "blur":
        out = ndimage.gaussian_filter(image, 0.4 + 2.6 * severity)
    elif kind == "streaks":
        y, x = np.mgrid[0:size, 0:size] - rng.uniform(0.3, 0.7, 2)[:, None, None] * size
        angle = np.arctan2(y, x)
        lines = np.cos(angle * rng.integers(6, 14)) ** 40  # thin bright spokes around the point
        out = image + (0.06 + 0.5 * severity) * lines
    elif kind == "motion":
        axis = int(rng.integers(0, 2))
        ghosts = sum(np.roll(image, shift, axis=axis) for shift in (size // 8, -size // 8)) / 2
        out = image + (0.08 + 0.5 * severity) * (ghosts - image.mean())
    elif kind == "bad window":
        if rng.random() < 0.5:  # squeezed: the image fills a narrow band of greys
            out = 0.5 + (image - 0.5) * (1.0 - 0.92 * severity)
        else:  # too narrow: everything but a thin band is clipped
            centre = float(np.median(image))
            out = (image - centre) / (1.0 - 0.9 * severity) + 0.5
    elif kind == "blank":
        out = np.full_like(image, rng.uniform(0.0, 0.6)) + rng.normal(0.0, 0.003, image.shape)
    else:
        raise ValueError(f"unknown degradation {kind!r}; expected one of {', '.join(DEGRADATIONS)}")
    return np.clip(out, 0.0, 1.0).astype(np.float32)


def true_quality(kind: str, severity: float) -> float:
    """The quality an ideal expert would give (the table above)."""
    if kind == "none":
        return 1.0
    if kind in ("blank", "wrong modality"):
        return 0.0
    return 1.0 - severity


def expert_rating(quality: float, level: int, rng: np.random.Generator) -> int:
    """The rating rule: round(1 + 2 q + e), clipped to 1-3, e ~ N(0, RATING_NOISE[level])."""
    return int(np.clip(np.rint(1.0 + 2.0 * quality + rng.normal(0.0, RATING_NOISE[level])), 1, 3))


def fake_patient(index: int, rng: np.random.Generator) -> dict:
    """Patient tags that look real and are not: the de-identification tests look for them."""
    return {
        "PatientName": f"{rng.choice(FAKE_SURNAMES)}^{rng.choice(FAKE_GIVEN)}",
        "PatientID": f"DEMO{index:05d}",
        "PatientBirthDate": f"19{rng.integers(30, 99)}{rng.integers(1, 13):02d}{rng.integers(1, 29):02d}",
        "PatientSex": str(rng.choice(["F", "M"])),
        "InstitutionName": "Demo General Hospital",
        "ReferringPhysicianName": "HOUSE^GREGORY",
        "AccessionNumber": f"ACC{index:06d}",
    }


def make_demo_set(out: Path, n_images: int = 600, seed: int = 0, resolution: int = 64) -> Path:
    """Write ``n_images`` images and their ratings under ``out``; returns the CSV's path."""
    out = Path(out)
    rng = np.random.default_rng(seed)
    rows = []
    for index in range(n_images):
        phantom = random_phantom(seed * 100_000 + index, resolution)
        kind = str(rng.choice(DEGRADATIONS, p=DEGRADATION_WEIGHTS))
        severity = float(rng.uniform())
        image, shown_modality = phantom.image, phantom.modality
        if kind == "wrong modality":  # the prompt stays; the image comes from another modality
            shown_modality = str(rng.choice([m for m in MODALITIES if m != phantom.modality]))
            image = make_phantom(shown_modality, seed * 100_000 + index, resolution=resolution).image
        pixels = degrade(image, kind, severity, rng)
        if index % 2 == 0:
            name = f"images/{index:04d}.png"
            write_png(out / name, pixels)
        else:
            name = f"images/{index:04d}.dcm"
            write_secondary_capture(
                out / name,
                pixels,
                prompt=phantom.prompt,
                model_version="data.demo_set phantom (not generated by a model)",
                modality=DICOM_MODALITY[shown_modality],
                patient=fake_patient(index, rng),
            )
        quality = true_quality(kind, severity)
        raters = random.Random(seed * 100_000 + index).sample(EXPERTS, 2 if rng.random() < SECOND_OPINION_RATE else 1)
        for _, level in raters:
            rating = expert_rating(quality, level, rng)
            rows.append({"image_path": name, "rating": rating, "modality": shown_modality, "expert_level": level, "prompt": phantom.prompt})
    return write_ratings(rows, out / "medical_ratings.csv")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.demo_set", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="data/demo", help="output folder (default data/demo)")
    parser.add_argument("--images", type=int, default=600, help="number of images (default 600)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    path = make_demo_set(Path(args.out), args.images, args.seed)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()

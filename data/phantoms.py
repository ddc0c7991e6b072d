"""Procedural medical images with prompts that say what they show.

The embedded default generator is trained on these phantoms, and tests and benchmarks use them
wherever real patient data would otherwise be needed. Every image is a pure function of its seed,
so a dataset is reproducible from a list of seeds alone.

Four modalities, each recognisable at a glance, each with optional findings that the prompt names:

- ``CT``:   axial abdominal slice (body outline, fat, liver, stomach, kidneys, aorta, spine);
            finding: a lesion, small or large, bright or dark, in the patient's left or right.
- ``MRI``:  axial T1 brain (skull, grey and white matter, ventricles); finding: a lesion.
- ``XRAY``: chest X-ray, PA view (lungs, heart shadow, ribs, spine, clavicles); findings: an
            opacity in one lung, or an enlarged heart.
- ``OCT``:  retinal B-scan (layered bands, foveal pit, bright RPE); findings: subretinal fluid,
            or intraretinal cysts.

Sides follow the radiological convention: the patient's left is on the image's right.
Images are float32 in [0, 1], shape (resolution, resolution).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import numpy as np

from data.modalities import MODALITIES

#: The finding kinds per modality; ``None`` (no finding) is always possible too.
FINDINGS = {
    "CT": ("lesion",),
    "MRI": ("lesion",),
    "XRAY": ("opacity", "enlarged heart"),
    "OCT": ("subretinal fluid", "intraretinal cysts"),
}


@dataclass
class Phantom:
    """One procedural image and the prompt that describes it."""

    image: np.ndarray  # float32, (size, size), values in [0, 1]
    prompt: str
    modality: str  # one of MODALITIES
    finding: str | None  # one of FINDINGS[modality], or None
    attributes: dict = field(default_factory=dict)  # side, size, brightness where they apply
    seed: int = 0


# ----------------------------------------------------------------------------- drawing helpers


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates in [-1, 1]: x grows to the image's right, y grows downwards."""
    axis = (np.arange(size, dtype=np.float32) + 0.5) / size * 2.0 - 1.0
    return np.meshgrid(axis, axis, indexing="xy")


def _ellipse(x, y, cx, cy, rx, ry, angle=0.0, edge=0.03):
    """Soft-edged filled ellipse: 1 inside, 0 outside, a smooth ramp about ``edge`` wide."""
    c, s = np.cos(angle), np.sin(angle)
    u = ((x - cx) * c + (y - cy) * s) / rx
    v = (-(x - cx) * s + (y - cy) * c) / ry
    distance = np.sqrt(u * u + v * v)
    scale = edge / max(min(rx, ry), 1e-3)
    return 1.0 / (1.0 + np.exp(np.clip((distance - 1.0) / scale, -50, 50)))


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
    """Low-frequency texture: coarse Gaussian noise, bilinearly upsampled to (size, size)."""
    coarse = rng.standard_normal((cells + 1, cells + 1)).astype(np.float32)
    positions = np.linspace(0, cells, size, dtype=np.float32)
    i0 = np.minimum(positions.astype(int), cells - 1)
    frac = positions - i0
    rows = coarse[i0] * (1 - frac)[:, None] + coarse[i0 + 1] * frac[:, None]
    return rows[:, i0] * (1 - frac)[None, :] + rows[:, i0 + 1] * frac[None, :]


def _paint(image, mask, value):
    """Blend ``value`` into ``image`` where ``mask`` is 1."""
    return image * (1.0 - mask) + value * mask


# ----------------------------------------------------------------------------- modalities


def _ct(rng, size, finding, attrs):
    x, y = _grid(size)
    sx = rng.uniform(0.78, 0.9)  # body half-width
    sy = rng.uniform(0.58, 0.68)
    cy = rng.uniform(-0.04, 0.04)
    img = np.full((size, size), 0.02, np.float32)  # air
    img = _paint(img, _ellipse(x, y, 0, cy, sx, sy), 0.30)  # subcutaneous fat
    img = _paint(img, _ellipse(x, y, 0, cy, sx - 0.07, sy - 0.07), 0.52)  # muscle / soft tissue
    # liver on the image left (patient's right), stomach on the image right
    img = _paint(img, _ellipse(x, y, -0.32, cy - 0.12, 0.36, 0.3, rng.uniform(-0.3, 0.1)), 0.62)
    img = _paint(img, _ellipse(x, y, 0.38, cy - 0.18, 0.2, 0.16), 0.40)
    for side in (-1, 1):  # kidneys, beside the spine
        img = _paint(img, _ellipse(x, y, side * 0.33, cy + 0.25, 0.1, 0.14, side * 0.4), 0.68)
    img = _paint(img, _ellipse(x, y, 0.06, cy + 0.12, 0.06, 0.06), 0.80)  # aorta with contrast
    img = _paint(img, _ellipse(x, y, 0, cy + 0.38, 0.13, 0.12), 0.97)  # vertebral body
    img = _paint(img, _ellipse(x, y, 0, cy + 0.5, 0.05, 0.04), 0.25)  # spinal canal
    img = img + 0.025 * _smooth_noise(rng, size, 12)
    if finding == "lesion":
        # patient's left = image right
        cx = (0.32 if attrs["side"] == "left" else -0.32) + rng.uniform(-0.05, 0.05)
        r = 0.16 if attrs["size"] == "large" else 0.08
        value = 0.95 if attrs["brightness"] == "bright" else 0.18
        img = _paint(img, _ellipse(x, y, cx, cy - 0.1 + rng.uniform(-0.05, 0.05), r, r * 0.9), value)
    return img


def _mri(rng, size, finding, attrs):
    x, y = _grid(size)
    rx, ry = rng.uniform(0.66, 0.74), rng.uniform(0.8, 0.88)
    tilt = rng.uniform(-0.12, 0.12)
    img = np.zeros((size, size), np.float32)
    img = _paint(img, _ellipse(x, y, 0, 0, rx + 0.08, ry + 0.08, tilt), 0.85)  # scalp fat (bright on T1)
    img = _paint(img, _ellipse(x, y, 0, 0, rx + 0.03, ry + 0.03, tilt), 0.08)  # skull (dark)
    img = _paint(img, _ellipse(x, y, 0, 0, rx, ry, tilt), 0.45)  # grey matter
    img = _paint(img, _ellipse(x, y, 0, 0, rx - 0.12, ry - 0.14, tilt), 0.68)  # white matter
    for side in (-1, 1):  # lateral ventricles: dark, butterfly-shaped
        img = _paint(img, _ellipse(x, y, side * 0.1, -0.05, 0.07, 0.25, side * 0.35 + tilt), 0.12)
    img = img + 0.03 * _smooth_noise(rng, size, 10)
    if finding == "lesion":
        cx = (0.35 if attrs["side"] == "left" else -0.35) + rng.uniform(-0.05, 0.05)
        r = rng.uniform(0.1, 0.14)
        img = _paint(img, _ellipse(x, y, cx, rng.uniform(-0.3, 0.3), r, r), 0.98)
    return img


def _xray(rng, size, finding, attrs):
    x, y = _grid(size)
    img = np.full((size, size), 0.12, np.float32)
    img = _paint(img, _ellipse(x, y, 0, 0.25, 0.95, 1.1), 0.62)  # thorax soft tissue
    lung_y = rng.uniform(-0.08, 0.02)
    for side in (-1, 1):  # lungs: dark (air)
        img = _paint(img, _ellipse(x, y, side * 0.38, lung_y, 0.28, 0.56, side * 0.08), 0.18)
    heart_w = 0.36 if finding == "enlarged heart" else 0.22
    img = _paint(img, _ellipse(x, y, 0.1, 0.32, heart_w, 0.24), 0.7)  # heart: to the patient's left
    img = _paint(img, np.clip(1.0 - np.abs(x) / 0.07, 0, 1) * (y > -0.9), 0.75)  # spine
    rib_phase = rng.uniform(0, 1)
    for side in (-1, 1):
        xs = side * x
        for k in range(6):  # ribs: bright arcs across the lung fields
            arc_y = -0.62 + 0.2 * (k + rib_phase * 0.3) + 0.22 * (xs - 0.35) ** 2
            rib = np.exp(-(((y - arc_y) / 0.025) ** 2)) * (xs > 0.05) * (xs < 0.75)
            img = img + 0.18 * rib
        clavicle = np.exp(-(((y - (-0.72 + 0.15 * xs)) / 0.03) ** 2)) * (xs > 0.05) * (xs < 0.6)
        img = img + 0.3 * clavicle
    img = img + 0.02 * _smooth_noise(rng, size, 14)
    if finding == "opacity":
        cx = (0.4 if attrs["side"] == "left" else -0.4) + rng.uniform(-0.05, 0.05)
        r = rng.uniform(0.13, 0.18)
        img = _paint(img, _ellipse(x, y, cx, lung_y + rng.uniform(-0.2, 0.2), r, r, edge=0.06), 0.78)
    return img


def _oct(rng, size, finding, attrs):
    x, y = _grid(size)
    base = rng.uniform(0.0, 0.15) + 0.08 * x * rng.uniform(-1, 1)  # slight tilt of the retina
    pit = 0.22 * np.exp(-((x / 0.22) ** 2))  # foveal pit: inner layers dip
    top = base - 0.45 + pit
    rpe = base + 0.2
    img = np.full((size, size), 0.05, np.float32)  # vitreous
    # layer boundaries between the inner surface and the RPE, with reflectivities
    bands = [(0.0, 0.85), (0.12, 0.35), (0.3, 0.62), (0.45, 0.25), (0.7, 0.55), (0.85, 0.3)]
    thickness = rpe - top
    for start, value in bands:
        boundary = top + start * thickness * (1 - 0.7 * pit / 0.22 * (start > 0))
        img = np.where(y > boundary, value, img).astype(np.float32)
    img = np.where(np.abs(y - rpe) < 0.05, 0.95, img)  # RPE: the brightest band
    img = np.where(y > rpe + 0.05, 0.4 - 0.3 * np.clip((y - rpe) / 0.5, 0, 1), img)  # choroid
    speckle = rng.standard_normal((size, size)).astype(np.float32)
    img = img * (1.0 + 0.18 * speckle) + 0.02 * _smooth_noise(rng, size, 8)
    if finding == "subretinal fluid":
        w = rng.uniform(0.2, 0.3)
        dome = _ellipse(x, y, rng.uniform(-0.08, 0.08), rpe - 0.03, w, 0.12) * (y < rpe - 0.03)
        img = _paint(img, dome, 0.03)
    elif finding == "intraretinal cysts":
        for _ in range(3):
            cx = rng.uniform(-0.45, 0.45)
            cyst = _ellipse(x, y, cx, base - 0.12 + rng.uniform(-0.04, 0.04), 0.1, 0.08)
            img = _paint(img, cyst, 0.03)
    return img


_DRAW = {"CT": _ct, "MRI": _mri, "XRAY": _xray, "OCT": _oct}


def _prompt(modality: str, finding: str | None, attrs: dict) -> str:
    head = {
        "CT": "CT: axial slice of the abdomen",
        "MRI": "MRI: axial brain",
        "XRAY": "chest X-ray: PA view",
        "OCT": "OCT: retinal layers",
    }[modality]
    if finding is None:
        return head
    if modality == "CT":
        return f"{head} with a {attrs['size']} {attrs['brightness']} lesion on the {attrs['side']}"
    if modality == "MRI":
        return f"{head} with a lesion on the {attrs['side']}"
    if finding == "opacity":
        return f"{head} with an opacity in the {attrs['side']} lung"
    return f"{head} with {'an' if finding == 'enlarged heart' else ''} {finding}".replace("  ", " ")


# ----------------------------------------------------------------------------- public API


def make_phantom(
    modality: str,
    seed: int,
    finding: str | None = None,
    resolution: int = 64,
    **attributes: str,
) -> Phantom:
    """Draw one phantom of ``modality`` with ``finding`` (or none), deterministically from ``seed``.

    Attributes the finding needs but that are not given (``side``, ``size`` and ``brightness`` for a
    CT lesion; ``side`` for an MRI lesion or an X-ray opacity) are drawn from the seed.
    """
    if modality not in _DRAW:
        raise ValueError(f"unknown modality {modality!r}; expected one of {', '.join(MODALITIES)}")
    if finding is not None and finding not in FINDINGS[modality]:
        raise ValueError(f"{modality} has no finding {finding!r}; expected one of {FINDINGS[modality]}")
    rng = np.random.default_rng(seed)
    attrs = {}
    if finding in ("lesion", "opacity"):
        attrs["side"] = attributes.get("side") or rng.choice(["left", "right"]).item()
    if modality == "CT" and finding == "lesion":
        attrs["size"] = attributes.get("size") or rng.choice(["small", "large"]).item()
        attrs["brightness"] = attributes.get("brightness") or rng.choice(["bright", "dark"]).item()
    image = np.clip(_DRAW[modality](rng, resolution, finding, attrs), 0.0, 1.0).astype(np.float32)
    return Phantom(image, _prompt(modality, finding, attrs), modality, finding, attrs, seed)


def random_phantom(seed: int, resolution: int = 64, finding_rate: float = 0.5) -> Phantom:
    """A phantom of a random modality; a finding with probability ``finding_rate``."""
    chooser = random.Random(seed)
    modality = chooser.choice(MODALITIES)
    finding = chooser.choice(FINDINGS[modality]) if chooser.random() < finding_rate else None
    return make_phantom(modality, seed, finding, resolution)


def phantom_set(n: int, first_seed: int = 0, resolution: int = 64) -> list[Phantom]:
    """``n`` random phantoms with consecutive seeds, for training and evaluation sets."""
    return [random_phantom(first_seed + i, resolution) for i in range(n)]


def stack_images(phantoms: list[Phantom]) -> np.ndarray:
    """The phantoms' images as one (N, 1, H, W) float32 array, the layout networks take."""
    return np.stack([p.image for p in phantoms])[:, None]


def all_prompts() -> list[str]:
    """Every prompt the phantoms can carry: the vocabulary of the default generator."""
    prompts = []
    for modality in MODALITIES:
        prompts.append(_prompt(modality, None, {}))
        for finding in FINDINGS[modality]:
            for side in ("left", "right"):
                for size in ("small", "large"):
                    for brightness in ("bright", "dark"):
                        attrs = {"side": side, "size": size, "brightness": brightness}
                        prompts.append(_prompt(modality, finding, attrs))
    return sorted(set(prompts))

"""The selector: judges every candidate before an expert sees it, and says why it rejects one.

An expert's time is the scarcest thing in the loop, so no blank, broken or wrong-modality image
should reach the ranking page. For each image and its prompt the selector returns a ``Verdict``:

1. Gates, plain rules with no learning: non-finite pixels, a blank (near-constant) image, too
   little dynamic range, too much clipping to black or white, a wrong size or shape.
2. A small network with two heads, trained on the experts' ratings CSV
   (``python -m workbench.selector train``, see ``optim/selector/training.py``):
   a quality score in [0, 1] and the probability of each modality the CSV names. The modality head
   is sized from the CSV, and the names (``Selector.modalities``) are saved with the weights (in
   ``selector.json`` and in the safetensors metadata), so a host's dermoscopy or fundus selector
   knows dermoscopy and fundus, and the shipped one knows CT, MRI, chest X-ray and OCT.
3. The modality check: the prompt's modality, read from its prefix (``CT:``, ``Fundus:`` ...) or
   given explicitly, must have probability at least ``min_modality_probability``. A prefix the
   selector does not know is no modality to it: such prompts get the gates and the quality check.
   A selector trained on ONE modality has a one-output head, whose probability is always 1: it
   checks no modality (there is nothing to tell that one from), and ``describe`` says so.

``Selector.load("gates")`` (``--selector gates``) is the rule gates alone, with no network: for a new
domain with no ratings yet. Its verdicts have no quality and no modality probabilities.

Reasons are written for the expert, e.g. ``quality 0.21 below 0.50`` or
``looks like chest X-ray (0.93); prompt asks for CT``. The selector sees only the image and the
prompt: never a ranking or anything else the expert is there to judge.

The selector is a model, like the generator, so it lives in ``optim``: the rejection sampler
(``workbench.sampler``) and offline training (``optim.train``) both use it. Its command line is
``workbench/selector.py``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn

from data.images import MedicalImage, rgb_to_gray, to_display
from data.modalities import MODALITIES, display_name, modality_name, modality_of_prompt

DEFAULT_SELECTOR = Path(__file__).resolve().parents[2] / "data" / "pretrained" / "selector"
WEIGHTS_FILE = "selector.safetensors"
CONFIG_FILE = "selector.json"
GATES = "gates"  # the selector name (``--selector gates``) of the rule gates alone


class SelectorLoadError(ValueError):
    """A selector folder that cannot be loaded: missing files, unreadable or inconsistent contents."""


@dataclass
class SelectorConfig:
    """Thresholds of the verdict; stored with the weights and changeable per call site."""

    quality_threshold: float = 0.5
    min_modality_probability: float = 0.5
    min_std: float = 0.02  # below: a blank image
    min_dynamic_range: float = 0.15  # 99th minus 1st percentile, on the [0, 1] scale
    max_clipped_fraction: float = 0.5  # share of pixels at pure black or pure white
    min_side: int = 32
    max_aspect: float = 2.0
    input_size: int = 64  # the network sees every image resized to this square


@dataclass
class Verdict:
    passed: bool
    quality: float | None  # None when the pixels are not finite and could not be scored
    modality_probabilities: dict[str, float]
    asked_modality: str | None  # the modality the prompt asks for, if it names one
    reasons: list[str] = field(default_factory=list)  # empty exactly when passed

    def summary(self) -> str:
        """One line for a table or a log."""
        if self.passed and self.quality is None:
            return "passed the rule gates"
        if self.passed:
            best = max(self.modality_probabilities, key=self.modality_probabilities.get)
            return f"passed: quality {self.quality:.2f}, {display_name(best)} {self.modality_probabilities[best]:.2f}"
        return "rejected: " + "; ".join(self.reasons)


class SelectorNet(nn.Module):
    """Four strided convolutions, global pooling, and two heads: quality logit and modality logits."""

    def __init__(self, channels: int = 32, modalities: int = len(MODALITIES)):
        super().__init__()
        layers, width = [], 1
        for out in (channels // 2, channels, channels * 2, channels * 2):
            layers += [nn.Conv2d(width, out, 3, stride=2, padding=1), nn.GroupNorm(4, out), nn.SiLU()]
            width = out
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.quality = nn.Linear(width, 1)
        self.modality = nn.Linear(width, modalities)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.features(images * 2.0 - 1.0)
        return self.quality(features).squeeze(1), self.modality(features)


def as_unit_array(image) -> np.ndarray:
    """A PIL image, a MedicalImage or an array as float32 (H, W) on the [0, 1] display scale."""
    if isinstance(image, MedicalImage):
        return to_display(image)
    if isinstance(image, Image.Image):
        scale = 65535.0 if image.mode.startswith("I;16") else 255.0
        if image.mode not in ("L", "I;16", "I;16B", "I;16L"):
            image = image.convert("L")
        return np.asarray(image, dtype=np.float32) / scale
    array = np.asarray(image)
    if array.ndim == 3 and array.shape[-1] in (3, 4):
        array = rgb_to_gray(array)
    if array.dtype == np.uint8:
        return array.astype(np.float32) / 255.0
    if array.dtype == np.uint16:
        return array.astype(np.float32) / 65535.0
    return array.astype(np.float32)


def gate_reasons(pixels: np.ndarray, config: SelectorConfig) -> list[str]:
    """The rule-based checks; each failure is one reason in plain words."""
    if pixels.ndim != 2:
        return [f"not a single grey image (array of shape {pixels.shape})"]
    height, width = pixels.shape
    reasons = []
    if min(height, width) < config.min_side or max(height, width) / min(height, width) > config.max_aspect:
        reasons.append(f"wrong size {width}x{height} (at least {config.min_side} pixels a side, aspect at most {config.max_aspect:g})")
    if not np.isfinite(pixels).all():
        return reasons + [f"image has {int((~np.isfinite(pixels)).sum())} NaN or infinite pixels"]
    if pixels.std() < config.min_std:
        return reasons + ["blank image"]
    low, high = np.percentile(pixels, [1, 99])
    if high - low < config.min_dynamic_range:
        reasons.append(f"too little contrast: dynamic range {high - low:.2f} below {config.min_dynamic_range:.2f}")
    clipped = float(((pixels <= 0.002) | (pixels >= 0.998)).mean())
    if clipped > config.max_clipped_fraction:
        reasons.append(f"{clipped:.0%} of pixels clipped to black or white (at most {config.max_clipped_fraction:.0%})")
    return reasons


def network_input(arrays: list[np.ndarray], size: int) -> torch.Tensor:
    """Resize each [0, 1] image to (size, size), area-averaged when shrinking: (N, 1, size, size)."""
    batch = []
    for array in arrays:
        tensor = torch.from_numpy(np.nan_to_num(np.clip(array, 0.0, 1.0)))[None, None]
        if tensor.shape[-2:] != (size, size):
            tensor = nn.functional.interpolate(tensor, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        batch.append(tensor[0])
    return torch.stack(batch)


class Selector:
    def __init__(self, net: SelectorNet | None, config: SelectorConfig | None = None, report: dict | None = None,
                 modalities: tuple[str, ...] = MODALITIES, name: str = "selector"):
        """``net`` None: the rule gates alone. ``modalities``: the names of the modality head's outputs."""
        if net is not None and net.modality.out_features != len(modalities):
            raise ValueError(f"the modality head has {net.modality.out_features} outputs but {len(modalities)} "
                             f"modalities are named ({', '.join(modalities)})")
        self.net = net.eval() if net is not None else None
        self.config = config or SelectorConfig()
        self.report = report or {}  # the validation report written at training time
        self.modalities = tuple(modalities) if net is not None else ()
        self.name = name  # where it came from, for the page: a folder, "the embedded selector" or GATES

    @classmethod
    def gates_only(cls, config: SelectorConfig | None = None) -> "Selector":
        """The rule gates with no network: no quality score, no modality check (a new domain with no ratings yet)."""
        return cls(None, config, name=GATES)

    @classmethod
    def load(cls, folder: str | Path | None = None, config: SelectorConfig | None = None) -> "Selector":
        """Load weights (safetensors only) and settings; ``None`` is the embedded default selector and
        ``"gates"`` the rule gates alone. The modality names come from ``selector.json`` (and must match
        the head's size and the names in the weights file's metadata, when it has them).

        A folder that cannot be loaded raises ``SelectorLoadError`` naming the file and what is wrong."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_file

        if folder is not None and str(folder) == GATES:
            return cls.gates_only(config)
        folder = Path(folder) if folder is not None else DEFAULT_SELECTOR
        weights, settings = folder / WEIGHTS_FILE, folder / CONFIG_FILE
        if not weights.is_file() or not settings.is_file():
            raise SelectorLoadError(f"{folder} is not a selector folder: expected {WEIGHTS_FILE} and {CONFIG_FILE}")
        try:
            meta = json.loads(settings.read_text())
        except ValueError as error:
            raise SelectorLoadError(f"{settings} is not a selector's settings (JSON): {error}") from error
        if not isinstance(meta, dict) or not isinstance(meta.get("channels"), int) or not isinstance(meta.get("config"), dict):
            raise SelectorLoadError(f"{settings}: expected 'modalities', 'channels' and 'config', as "
                                    "python -m workbench.selector train writes them")
        modalities = meta.get("modalities")
        if not modalities or not all(isinstance(m, str) and m for m in modalities):
            raise SelectorLoadError(f"{settings}: 'modalities' must list the modality head's names, got {modalities!r}")
        try:
            with safe_open(weights, "pt") as handle:
                stored = (handle.metadata() or {}).get("modalities")
            state = load_file(weights)
        except SafetensorError as error:
            raise SelectorLoadError(f"{weights} is not a safetensors file: {error}") from error
        if stored is not None and json.loads(stored) != modalities:
            raise SelectorLoadError(f"{settings} names the modalities {modalities} but {weights} was saved with "
                                    f"{json.loads(stored)}")
        if "modality.weight" not in state:
            raise SelectorLoadError(f"{weights} holds no selector weights (no modality head)")
        head = state["modality.weight"].shape[0]
        if head != len(modalities):
            raise SelectorLoadError(f"{settings} names {len(modalities)} modalities but the modality head in {weights} "
                                    f"has {head} outputs")
        net = SelectorNet(meta["channels"], modalities=head)
        try:
            net.load_state_dict(state)
        except RuntimeError as error:
            raise SelectorLoadError(f"{weights} does not fit a selector of {meta['channels']} channels "
                                    f"({settings}): {error}") from error
        try:
            thresholds = config or SelectorConfig(**meta["config"])
        except TypeError as error:
            raise SelectorLoadError(f"{settings}: 'config' holds a setting the selector does not have: {error}") from error
        name = "the embedded selector" if folder == DEFAULT_SELECTOR else str(folder)
        return cls(net, thresholds, meta.get("report"), tuple(modalities), name)

    def save(self, folder: str | Path, channels: int) -> Path:
        from safetensors.torch import save_file

        if self.net is None:
            raise ValueError("the rule gates alone have no weights to save")
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        names = list(self.modalities)
        save_file({k: v.contiguous() for k, v in self.net.state_dict().items()}, folder / WEIGHTS_FILE,
                  metadata={"modalities": json.dumps(names)})
        meta = {"modalities": names, "channels": channels, "config": asdict(self.config), "report": self.report}
        (folder / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
        return folder

    def describe(self) -> str:
        """Which selector this is and what it checks, in one line for the page."""
        c = self.config
        gates = (f"rule gates (non-finite pixels, blank, contrast below {c.min_dynamic_range:g}, over "
                 f"{c.max_clipped_fraction:.0%} clipped, under {c.min_side} px a side or aspect over {c.max_aspect:g})")
        if self.net is None:
            return f"{GATES}: the {gates} alone; no quality score and no modality check (`--selector gates`)"
        trained = self.report.get("ratings")
        source = f"{self.name}" + (f", trained on {Path(trained).name}" if trained else "")
        if len(self.modalities) == 1:  # a one-output softmax: the asked modality always has probability 1
            return (f"{source}: the {gates} and quality at least {c.quality_threshold:.2f}; no modality check "
                    f"(trained on {display_name(self.modalities[0])} images alone, it has no other modality to tell "
                    "them from)")
        prefixes = ", ".join(f"{display_name(m)}:" for m in self.modalities)
        return (f"{source}: the {gates}, quality at least {c.quality_threshold:.2f}, and, for prompts starting with "
                f"{prefixes}, that modality at least {c.min_modality_probability:.2f} likely")

    @torch.no_grad()
    def scores(self, arrays: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        """Quality (N,) and modality probabilities (N, M) for [0, 1] images, in one network call (not for the gates alone)."""
        quality_logits, modality_logits = self.net(network_input(arrays, self.config.input_size))
        return torch.sigmoid(quality_logits).numpy(), torch.softmax(modality_logits, dim=1).numpy()

    def judge(self, images: list, prompt: str | None = None, modality: str | None = None) -> list[Verdict]:
        """Verdicts for a group of images drawn for one prompt (or one explicitly named modality)."""
        asked = self._asked_modality(prompt, modality)
        arrays = [as_unit_array(image) for image in images]
        gates = [gate_reasons(array, self.config) for array in arrays]
        scorable = [i for i, array in enumerate(arrays) if array.ndim == 2 and np.isfinite(array).all()]
        scorable = scorable if self.net is not None else []  # the gates alone score nothing
        quality, probabilities = self.scores([arrays[i] for i in scorable]) if scorable else ([], [])
        verdicts = []
        for i, reasons in enumerate(gates):
            if i not in scorable:  # the gates alone, or pixels no network can score (a gate names why)
                verdicts.append(Verdict(not reasons, None, {}, asked, reasons))
                continue
            row = scorable.index(i)
            q, p = float(quality[row]), {m: float(v) for m, v in zip(self.modalities, probabilities[row])}
            if q < self.config.quality_threshold:
                reasons.append(f"quality {q:.2f} below {self.config.quality_threshold:.2f}")
            if asked is not None and p[asked] < self.config.min_modality_probability:
                seen = max(p, key=p.get)
                reasons.append(f"looks like {display_name(seen)} ({p[seen]:.2f}); prompt asks for {display_name(asked)}")
            verdicts.append(Verdict(not reasons, q, p, asked, reasons))
        return verdicts

    def _asked_modality(self, prompt: str | None, modality: str | None) -> str | None:
        """The modality to check: the one given (which this selector must know), else the prompt's prefix
        when it names one this selector knows; the gates alone check none."""
        if self.net is None:
            return None
        if modality is not None:
            asked = modality_name(modality)
            if asked not in self.modalities:
                raise ValueError(f"unknown modality {modality!r}; this selector knows {', '.join(self.modalities)}")
            return asked
        return modality_of_prompt(prompt, self.modalities) if prompt else None

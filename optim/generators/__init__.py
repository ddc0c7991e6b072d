"""Generator families: one interface (``base.Generator``), one file per family.

    base.py              the interface every family meets, loading, and the sampling loop they share
    adapters.py          LoRA adapters on the denoiser, the reference (adapters off), versions, LoRA files
    kernels.py           the step kernels and their log-probabilities: stochastic DDIM, the Flow-GRPO SDE
    stable_diffusion.py  Stable Diffusion 1.x / 2.x
    sdxl.py              Stable Diffusion XL
    flow.py              Stable Diffusion 3 / 3.5 and FLUX (rectified flow)

``load_generator(path)`` (also ``Generator.load`` and ``optim.policy.Policy.load``) reads the folder's
``model_index.json`` and loads it with the family that names its ``_class_name``.
"""

from __future__ import annotations

import json
from pathlib import Path

from optim.generators.base import (
    DEFAULT_MODEL,
    Generator,
    ModelLoadError,
    Samples,
    candidate_seeds,
)
from optim.generators.flow import Flux, StableDiffusion3
from optim.generators.sdxl import StableDiffusionXL
from optim.generators.stable_diffusion import StableDiffusion

FAMILIES: list[type[Generator]] = [StableDiffusion, StableDiffusionXL, StableDiffusion3, Flux]


def supported() -> str:
    """One line naming every family and the pipeline class it loads."""
    return "; ".join(f"{f.family} ({', '.join(f.pipeline_classes)})" for f in FAMILIES)


def family_for(path: Path) -> type[Generator]:
    """The family of a local diffusers folder, from ``model_index.json``; a clear refusal otherwise."""
    path = Path(path)
    if not path.exists():
        raise ModelLoadError(f"model folder not found: {path}")
    if path.is_file():
        hint = f": pass its folder, {path.parent}" if path.name == "model_index.json" else ""
        raise ModelLoadError(f"{path} is a file; a model is a diffusers pipeline folder{hint}")
    index = path / "model_index.json"
    if not index.is_file():
        raise ModelLoadError(f"{path} is not a diffusers pipeline folder (no model_index.json)")
    try:
        kind = json.loads(index.read_text()).get("_class_name")
    except (ValueError, AttributeError) as error:
        raise ModelLoadError(f"{index} is not a diffusers model index: {error}") from error
    for family in FAMILIES:
        if kind in family.pipeline_classes:
            return family
    raise ModelLoadError(f"{path} holds a {kind}, which is not supported: the workbench loads {supported()}")


def load_generator(model: str | Path | None = None, **options) -> Generator:
    """``Generator.load``: the embedded default (None) or a local folder of any supported family."""
    return Generator.load(model, **options)


__all__ = ["DEFAULT_MODEL", "FAMILIES", "Flux", "Generator", "ModelLoadError", "Samples", "StableDiffusion", "StableDiffusion3",
           "StableDiffusionXL", "candidate_seeds", "family_for", "load_generator"]

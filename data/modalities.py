"""The imaging modalities the workbench knows, their names, and how prompts and files name them.

The built-in vocabulary serves the phantoms, the demo set and the shipped selector: ``CT``, ``MRI``,
``XRAY`` (chest radiograph) and ``OCT`` (retinal optical coherence tomography). Users write these
many ways (``MR``, ``X-ray``, DICOM's ``DX`` / ``CR`` / ``OPT``), so every place that reads a
modality goes through ``canonical_modality`` or ``modality_name``.

A host's own domain brings its own names (``dermoscopy``, ``fundus``, ``mammography`` ...): a
selector knows the modalities of the ratings CSV it was trained on (``optim.selector``), and
``modality_name`` keeps any other name, in lower case, so ``Fundus`` and ``fundus`` are one modality.
"""

from __future__ import annotations

from collections.abc import Iterable

MODALITIES = ("CT", "MRI", "XRAY", "OCT")

#: How each modality reads in a message to an expert.
MODALITY_NAMES = {"CT": "CT", "MRI": "MRI", "XRAY": "chest X-ray", "OCT": "OCT"}

#: The DICOM Modality code written for each (Secondary Capture of generated or demo images); other
#: modalities are written as ``OT`` (DICOM's "other").
DICOM_MODALITY = {"CT": "CT", "MRI": "MR", "XRAY": "DX", "OCT": "OPT"}

#: The words each prompt starts with, per modality; ``modality_of_prompt`` reads them back.
PROMPT_PREFIX = {"CT": "CT:", "MRI": "MRI:", "XRAY": "chest X-ray:", "OCT": "OCT:"}

#: Other spellings, including DICOM Modality codes (MR, CR, DX, OPT), mapped to ours.
_ALIASES = {
    "ct": "CT",
    "mri": "MRI",
    "mr": "MRI",
    "xray": "XRAY",
    "x-ray": "XRAY",
    "chest x-ray": "XRAY",
    "chest xray": "XRAY",
    "cxr": "XRAY",
    "cr": "XRAY",
    "dx": "XRAY",
    "oct": "OCT",
    "opt": "OCT",
}


def canonical_modality(name: str | None) -> str | None:
    """``MODALITIES`` member for a spelling such as ``mr``, ``X-ray`` or ``DX``; None if unknown."""
    if name is None:
        return None
    return _ALIASES.get(str(name).strip().lower())


def modality_name(name: str) -> str:
    """A modality as the workbench keeps it: one of ``MODALITIES`` for any of their spellings, any other
    name in lower case with its spaces collapsed (``" Fundus  photo"`` -> ``"fundus photo"``); ``""`` for none."""
    return canonical_modality(name) or " ".join(str(name).split()).lower()


def display_name(modality: str) -> str:
    """How a modality reads in a message to an expert: ``chest X-ray`` for ``XRAY``, other names as kept."""
    return MODALITY_NAMES.get(modality, modality)


def modality_of_prompt(prompt: str, known: Iterable[str] | None = MODALITIES) -> str | None:
    """The modality a prompt asks for, read from its prefix (``CT:``, ``Dermoscopy:`` ...), when it is one
    of ``known`` (a selector's modalities; the built-in four by default; None: any prefix); None otherwise."""
    head, colon, _ = prompt.strip().partition(":")
    name = modality_name(head) if colon else ""
    return name if name and (known is None or name in set(known)) else None

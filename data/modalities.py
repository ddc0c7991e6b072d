"""The imaging modalities the workbench knows, their names, and how prompts and files name them.

One vocabulary serves the phantoms, the ratings CSV, the selector's modality check and the page:
``CT``, ``MRI``, ``XRAY`` (chest radiograph) and ``OCT`` (retinal optical coherence tomography).
Users write these many ways (``MR``, ``X-ray``, DICOM's ``DX`` / ``CR`` / ``OPT``), so every
place that reads a modality goes through ``canonical_modality``.
"""

from __future__ import annotations

MODALITIES = ("CT", "MRI", "XRAY", "OCT")

#: How each modality reads in a message to an expert.
MODALITY_NAMES = {"CT": "CT", "MRI": "MRI", "XRAY": "chest X-ray", "OCT": "OCT"}

#: The DICOM Modality code written for each (Secondary Capture of generated or demo images).
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


def modality_of_prompt(prompt: str) -> str | None:
    """The modality a prompt asks for, read from its prefix (``CT:``, ``OCT:`` ...), or None."""
    head, colon, _ = prompt.strip().partition(":")
    return canonical_modality(head) if colon else None

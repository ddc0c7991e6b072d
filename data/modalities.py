"""The imaging modalities the workbench knows, their names, and how prompts and files name them.

The built-in vocabulary serves the phantoms, the demo set and the shipped selector: ``CT``, ``MRI``,
``XRAY`` (chest radiograph) and ``OCT`` (retinal optical coherence tomography). Users write these
many ways (``MR``, ``X-ray``, DICOM's ``DX`` / ``CR`` / ``OPT``), so every place that reads a
modality goes through ``canonical_modality`` or ``modality_name``.

A host's own domain brings its own names (``dermoscopy``, ``fundus``, ``mammography`` ...): a
selector knows the modalities of the ratings CSV it was trained on (``optim.selector.model``), and
``modality_name`` keeps any other name, in lower case, so ``Fundus`` and ``fundus`` are one modality.

A modality name is short: at most ``MAX_MODALITY_WORDS`` words and ``MAX_MODALITY_CHARS`` characters of
letters, digits and ``MODALITY_PUNCTUATION`` (``modality_name_problem``). The ratings CSV refuses a
row whose name is not one, and a prompt's prefix is its modality only when it is one, so that a prompt
such as ``Axial slice, soft-tissue window: liver`` names no modality and an exported ratings CSV always
imports again.
"""

from __future__ import annotations

from collections.abc import Iterable

MODALITIES = ("CT", "MRI", "XRAY", "OCT")

#: The longest modality name (it becomes a prompt prefix and a label on the page), in characters and words.
MAX_MODALITY_CHARS = 40
MAX_MODALITY_WORDS = 4
#: What a modality name may hold besides letters, digits and single spaces (``PET/CT``, ``T1-weighted MRI``).
MODALITY_PUNCTUATION = "-/+.()'&"

#: The modality an export writes where a rated image's prompt names none (the ratings CSV needs one).
UNKNOWN_MODALITY = "unknown"

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


def modality_name_problem(text: str) -> str | None:
    """Why ``text`` is not a modality name (judged as ``modality_name`` keeps it), in words; None when it is one."""
    name = modality_name(text)
    if not name:
        return "empty"
    if (len(name) > MAX_MODALITY_CHARS or len(name.split()) > MAX_MODALITY_WORDS
            or not all(c.isalnum() or c == " " or c in MODALITY_PUNCTUATION for c in name)):
        return (f"{str(text).strip()[:60]!r} is not a modality name (at most {MAX_MODALITY_WORDS} words and "
                f"{MAX_MODALITY_CHARS} characters: letters, digits, spaces and {' '.join(MODALITY_PUNCTUATION)})")
    return None


def display_name(modality: str) -> str:
    """How a modality reads in a message to an expert: ``chest X-ray`` for ``XRAY``, other names as kept."""
    return MODALITY_NAMES.get(modality, modality)


def modality_of_prompt(prompt: str, known: Iterable[str] | None = MODALITIES) -> str | None:
    """The modality a prompt asks for, read from its prefix (``CT:``, ``Dermoscopy:`` ...), when it is one
    of ``known`` (a selector's modalities; the built-in four by default; None: any prefix that is a modality
    name, ``modality_name_problem``); None otherwise."""
    head, colon, _ = prompt.strip().partition(":")
    if not colon or modality_name_problem(head) is not None:
        return None
    name = modality_name(head)
    return name if known is None or name in set(known) else None


def prompt_modality(prompt: str) -> str:
    """The modality a prompt names by its prefix (a host's own modalities too), or "no modality": what the
    reward model's held-out accuracy and GRPO's balanced weights group prompts by."""
    return modality_of_prompt(prompt, known=None) or "no modality"

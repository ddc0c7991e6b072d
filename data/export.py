"""The preference datasets users download, in the formats that training tools already read.

Input is plain records (``RankedGroupRecord`` and the records it holds), which the store builds;
this module needs nothing else. ``export(kind, records, path, secret=...)`` writes one of:

- ``pickapic``: Pick-a-Pic / Diffusion-DPO parquet. One row per two candidates an expert ranked:
  ``caption, jpg_0, jpg_1, label_0, label_1`` (1/0, or 0.5/0.5 for candidates tied in one tier,
  as Pick-a-Pic has ties), ``user_id, ranking_id, created_at, model_0, model_1`` and
  ``expert_level`` (the loss weight, see optim.preference.rewards). ``jpg_0`` is the candidate generated first,
  so the position says nothing about the preference. The columns are named jpg_* but hold PNG
  bytes: Pick-a-Pic readers, optim.train's among them, decode whatever bytes they are given.
- ``trl``: TRL preference parquet, ``prompt, chosen, rejected``, one row per decided pair; ties
  give no row (no preference). TRL's vision DPO puts the images in an ``images`` column and keeps
  ``chosen`` / ``rejected`` as text, which fits a model that writes text about an image; here the
  generated images ARE the answers, so ``chosen`` and ``rejected`` are the image columns.
- ``groups``: ImageReward-style ranking groups, one row per expert's ranking: ``prompt``,
  ``generations`` (the ranked candidates' images, in generation order), ``ranking`` (each one's
  tier number, counted from 1: lower is better, ties equal), ``expert_level``, ``user_id`` and
  ``ranking_id``.
- ``ratings_csv``: a zip of ``medical_ratings.csv`` (data.ratings' five columns) and ``images/``:
  one row per ``RatingRecord`` (candidates nobody rated give no row and no image). With
  ``dicom=True`` each image also goes in as a de-identified DICOM Secondary Capture beside its PNG;
  the CSV names the PNGs. The modality column is the group's modality when it is a modality name
  (``data.modalities.modality_name_problem``, the rule the CSV's reader applies), else ``unknown``
  (a prompt that names none, or whose prefix is no modality name), so the zip always imports again.
- ``ab``: blind A/B judgements (``ABJudgementRecord``, not ranked groups), one row each:
  ``judgement_id, user_id, expert_level, prompt, seed, version_a`` (the older version),
  ``version_b`` (the newer), ``left`` (the version shown on the left), ``verdict`` ("a", "b" or
  "same": which VERSION won, not which side), ``created_at, seconds``. No images: the two versions,
  the prompt and the seed draw them again.

Every pair and group row carries ``source``: "human" for an expert's ranking, "ai" for a group the
reward model ranked for an amplified update (expert level 0, user_id of "reward-model"). The control
room exports AI rows only when asked, so a download is human preferences unless it says otherwise.

Image columns are Hugging Face ``datasets.Image`` structs ``{bytes, path}`` (path empty), with the
features in the parquet metadata, so ``datasets.load_dataset("parquet", data_files=...)`` gives
images back. Every image is PNG: a candidate from an imported DICOM arrives already de-identified,
as PNG. Experts appear only as ``user_id``, a keyed hash of their name under the installation's
secret (``pseudonym``); the name itself is never written. A file is written under a temporary name
in its folder and renamed into place, so a reader never sees half of it.
"""

from __future__ import annotations

import hashlib
import hmac
import io
import re
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from datasets import Features, Image as ImageFeature, List, Value
from PIL import Image

from data.deid import Deidentifier, deidentify_file
from data.files import write_atomically
from data.images import write_secondary_capture
from data.modalities import DICOM_MODALITY, UNKNOWN_MODALITY, modality_name, modality_name_problem
from data.ratings import write_ratings

CandidateId = str | int


@dataclass(frozen=True)
class CandidateRecord:
    id: CandidateId
    png_bytes: bytes  # the image as the expert saw it, PNG-encoded
    model_version: str


@dataclass(frozen=True)
class RankingRecord:
    ranking_id: str
    expert: str  # the name; exported only as its pseudonym
    level: int  # 1-3
    tiers: list[list[CandidateId]]  # best first; a tier holds candidates the expert tied
    created_at: datetime  # naive times are taken as UTC
    source: str = "human"  # "ai": the reward model ranked the group (level 0), never a human preference


@dataclass(frozen=True)
class RatingRecord:
    candidate_id: CandidateId
    expert: str
    level: int
    rating: int  # 1-3, data.ratings' scale


@dataclass(frozen=True)
class RankedGroupRecord:
    group_id: str
    prompt: str
    candidates: list[CandidateRecord]  # in generation order
    rankings: list[RankingRecord]
    modality: str | None = None  # for ratings_csv only: "unknown" there when None or no modality name
    ratings: tuple[RatingRecord, ...] = ()


@dataclass(frozen=True)
class ABJudgementRecord:
    """An expert's blind verdict on two versions' images of one prompt and seed (``data.store.ABJudgement``)."""

    judgement_id: str
    expert: str  # the name; exported only as its pseudonym
    level: int
    prompt: str
    seed: int
    version_a: str  # the older version
    version_b: str  # the newer version
    left: str  # "a" or "b": which version was shown on the left
    verdict: str  # "a", "b" or "same"
    created_at: datetime
    seconds: float | None = None


KINDS = ("pickapic", "trl", "groups", "ratings_csv", "ab")

_IMAGE = ImageFeature()
_TIME = Value("timestamp[us, tz=UTC]")
PICKAPIC_FEATURES = Features({
    "caption": Value("string"), "jpg_0": _IMAGE, "jpg_1": _IMAGE,
    "label_0": Value("float64"), "label_1": Value("float64"),
    "user_id": Value("int64"), "ranking_id": Value("string"), "created_at": _TIME,
    "model_0": Value("string"), "model_1": Value("string"), "expert_level": Value("int8"), "source": Value("string"),
})
TRL_FEATURES = Features({"prompt": Value("string"), "chosen": _IMAGE, "rejected": _IMAGE, "source": Value("string")})
GROUPS_FEATURES = Features({
    "prompt": Value("string"), "generations": List(_IMAGE), "ranking": List(Value("int32")),
    "expert_level": Value("int8"), "user_id": Value("int64"), "ranking_id": Value("string"), "source": Value("string"),
})
AB_FEATURES = Features({
    "judgement_id": Value("string"), "user_id": Value("int64"), "expert_level": Value("int8"),
    "prompt": Value("string"), "seed": Value("int64"), "version_a": Value("string"), "version_b": Value("string"),
    "left": Value("string"), "verdict": Value("string"), "created_at": _TIME, "seconds": Value("float64"),
})


def export(kind: str, records: Iterable[RankedGroupRecord | ABJudgementRecord], path: str | Path, *,
           secret: bytes | str, dicom: bool = False) -> Path:
    """Write ``records`` as the dataset ``kind`` (one of ``KINDS``) to ``path``, atomically; returns the path.

    ``records`` are ``ABJudgementRecord`` for kind ``ab``, ``RankedGroupRecord`` for the others.

    ``secret`` is the installation's key for the experts' pseudonyms and the DICOM UIDs; keep it
    the same across exports so an expert keeps one ``user_id``. ``dicom`` applies to ratings_csv.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown export kind {kind!r}; expected one of {', '.join(KINDS)}")
    if dicom and kind != "ratings_csv":
        raise ValueError(f"dicom=True applies to ratings_csv only, not {kind!r}")
    _key(secret)  # an empty secret fails here, before any work
    records = list(records)
    if kind == "ratings_csv":
        return write_atomically(Path(path), lambda temporary: _write_ratings_zip(records, temporary, secret, dicom))
    features, rows = {  # generators: only the chosen one runs
        "pickapic": (PICKAPIC_FEATURES, _pickapic_rows(records, secret)),
        "trl": (TRL_FEATURES, _trl_rows(records)),
        "groups": (GROUPS_FEATURES, _groups_rows(records, secret)),
        "ab": (AB_FEATURES, _ab_rows(records, secret)),
    }[kind]
    table = pa.Table.from_pylist(list(rows), schema=features.arrow_schema)  # the schema carries the HF features
    return write_atomically(Path(path), lambda temporary: pq.write_table(table, temporary))


def pseudonym(expert: str, secret: bytes | str) -> int:
    """The expert's stable ``user_id``: HMAC-SHA256 of the name under ``secret``, as a non-negative int64.

    An int, as Pick-a-Pic's user_id is. Without the secret nobody can test a guessed name against it.
    """
    digest = hmac.new(_key(secret), expert.encode(), hashlib.sha256).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _key(secret: bytes | str) -> bytes:
    key = secret.encode() if isinstance(secret, str) else secret
    if not key:
        raise ValueError("secret is empty: pseudonyms would be a plain hash of the names, which anyone can guess")
    return key


def _pairs(group: RankedGroupRecord, ranking: RankingRecord) -> Iterator[tuple[CandidateRecord, CandidateRecord, float]]:
    """(a, b, label of a) for every two candidates the ranking covers, a generated before b.

    The label is 1.0 when a is in a better tier, 0.0 when b is, 0.5 when they share one.
    """
    tier = _tier_numbers(group, ranking)
    ranked = [candidate for candidate in group.candidates if candidate.id in tier]
    for index, a in enumerate(ranked):
        for b in ranked[index + 1:]:
            yield a, b, 0.5 if tier[a.id] == tier[b.id] else float(tier[a.id] < tier[b.id])


def _tier_numbers(group: RankedGroupRecord, ranking: RankingRecord) -> dict[CandidateId, int]:
    """Each ranked candidate's tier, counted from 1; an id the group does not hold is a ``ValueError``."""
    known = {candidate.id for candidate in group.candidates}
    numbers = {candidate: number for number, tier in enumerate(ranking.tiers, start=1) for candidate in tier}
    unknown = [str(candidate) for candidate in numbers if candidate not in known]
    if unknown:
        raise ValueError(f"ranking {ranking.ranking_id} of group {group.group_id} names unknown candidates: {', '.join(unknown)}")
    return numbers


def _pickapic_rows(records: list[RankedGroupRecord], secret: bytes | str) -> Iterator[dict]:
    for group in records:
        for ranking in group.rankings:
            for a, b, label in _pairs(group, ranking):
                yield {
                    "caption": group.prompt, "jpg_0": _image(a), "jpg_1": _image(b),
                    "label_0": label, "label_1": 1.0 - label,
                    "user_id": pseudonym(ranking.expert, secret), "ranking_id": str(ranking.ranking_id),
                    "created_at": ranking.created_at, "model_0": a.model_version, "model_1": b.model_version,
                    "expert_level": ranking.level, "source": ranking.source,
                }


def _trl_rows(records: list[RankedGroupRecord]) -> Iterator[dict]:
    for group in records:
        for ranking in group.rankings:
            for a, b, label in _pairs(group, ranking):
                if label != 0.5:
                    chosen, rejected = (a, b) if label == 1.0 else (b, a)
                    yield {"prompt": group.prompt, "chosen": _image(chosen), "rejected": _image(rejected),
                           "source": ranking.source}


def _groups_rows(records: list[RankedGroupRecord], secret: bytes | str) -> Iterator[dict]:
    for group in records:
        for ranking in group.rankings:
            tier = _tier_numbers(group, ranking)
            ranked = [candidate for candidate in group.candidates if candidate.id in tier]
            yield {
                "prompt": group.prompt, "generations": [_image(candidate) for candidate in ranked],
                "ranking": [tier[candidate.id] for candidate in ranked], "expert_level": ranking.level,
                "user_id": pseudonym(ranking.expert, secret), "ranking_id": str(ranking.ranking_id),
                "source": ranking.source,
            }


def _ab_rows(records: list[ABJudgementRecord], secret: bytes | str) -> Iterator[dict]:
    for record in records:
        if not isinstance(record, ABJudgementRecord):
            raise ValueError(f"the ab export takes ABJudgementRecord rows, not {type(record).__name__}")
        yield {
            "judgement_id": str(record.judgement_id), "user_id": pseudonym(record.expert, secret),
            "expert_level": record.level, "prompt": record.prompt, "seed": record.seed,
            "version_a": record.version_a, "version_b": record.version_b,
            "left": record.version_a if record.left == "a" else record.version_b, "verdict": record.verdict,
            "created_at": record.created_at, "seconds": record.seconds,
        }


def _write_ratings_zip(records: list[RankedGroupRecord], path: Path, secret: bytes | str, dicom: bool) -> None:
    """The ratings CSV and its images, built in a temporary folder, then zipped to ``path``."""
    deidentifier = Deidentifier(secret)
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        (root / "images").mkdir()
        rows = []
        for group in records:
            named = group.modality or ""
            modality = UNKNOWN_MODALITY if modality_name_problem(named) is not None else modality_name(named)
            candidates = {candidate.id: candidate for candidate in group.candidates}
            for rating in group.ratings:
                if rating.candidate_id not in candidates:
                    raise ValueError(f"a rating of group {group.group_id} names unknown candidate {rating.candidate_id}")
                candidate = candidates[rating.candidate_id]
                name = f"images/{_file_stem(group.group_id)}_{_file_stem(candidate.id)}"
                if not (root / f"{name}.png").exists():  # a candidate rated twice is stored once
                    (root / f"{name}.png").write_bytes(_image(candidate)["bytes"])
                    if dicom:
                        _write_dicom(root / f"{name}.dcm", candidate, group.prompt, modality, deidentifier)
                rows.append({"image_path": f"{name}.png", "rating": rating.rating, "modality": modality,
                             "expert_level": rating.level, "prompt": group.prompt})
        write_ratings(rows, root / "medical_ratings.csv")
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as archive:
            for file in sorted(file for file in root.rglob("*") if file.is_file()):
                archive.write(file, file.relative_to(root).as_posix())


def _write_dicom(path: Path, candidate: CandidateRecord, prompt: str, modality: str, deidentifier: Deidentifier) -> None:
    """The candidate as a Secondary Capture, then de-identified in place: no patient tag, whatever the defaults."""
    with Image.open(io.BytesIO(candidate.png_bytes)) as image:
        sixteen_bits = image.mode.startswith("I")  # 16-bit PNGs open as "I;16" or "I"
        pixels = np.asarray(image if sixteen_bits else image.convert("L"), dtype=np.float64)
    write_secondary_capture(path, pixels / (65535.0 if sixteen_bits else 255.0), prompt=prompt,
                            model_version=candidate.model_version, modality=DICOM_MODALITY.get(modality, "OT"))
    deidentify_file(path, path, deidentifier)


def _image(candidate: CandidateRecord) -> dict:
    """The candidate's PNG as a ``datasets.Image`` struct; anything but PNG bytes is a ``ValueError``."""
    if not candidate.png_bytes.startswith(b"\x89PNG\r\n\x1a\n"):
        raise ValueError(f"candidate {candidate.id}: png_bytes is not a PNG image")
    return {"bytes": candidate.png_bytes, "path": None}


def _file_stem(identifier: CandidateId) -> str:
    """An id as part of a file name inside the zip; ids that could climb out of ``images/`` are refused."""
    text = str(identifier)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", text):
        raise ValueError(f"id {text!r} cannot be a file name: use letters, digits, '_', '.' and '-'")
    return text

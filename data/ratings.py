"""The ratings CSV that experts already keep, read so that every fault is found at once.

One row per rated image, columns ``image_path,rating,modality,expert_level,prompt`` (MINIM's
layout). A rating on the configured scale (1-3 by default) becomes a score in [0, 1]; the expert
level (1-3) is kept as given, for the trainer to use as a loss weight, never to change a label; the
modality may be any short name (a host's own domain: see ``RatingsConfig.modalities``; what a modality
name may hold: ``data.modalities.modality_name_problem``).

Experts edit these files in spreadsheets, so a faulty row must not cost them the rest of the file:
``read_ratings`` checks every row, keeps the good ones, and names each fault by the row number the
spreadsheet shows (header row 1, first data row 2) and the column at fault. Only a file that is
unusable as a whole (missing, not CSV text, without rows, lacking columns) raises.

Rows are split with the ``csv`` module rather than ``pandas.read_csv``: pandas can drop a row with
too many fields but cannot say which row it was, and its index skips blank lines, so its row
numbers drift from the spreadsheet's. Every cell stays a string (empty stays empty) until checked.
"""

from __future__ import annotations

import csv
import math
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import pandas as pd

from data.experts import LEVELS
from data.images import ImageReadError, read_image
from data.modalities import modality_name, modality_name_problem

#: The columns of a ratings file, in the order ``write_ratings`` writes them.
COLUMNS = ("image_path", "rating", "modality", "expert_level", "prompt")

#: The columns of ``Ratings.rows``.
ROW_COLUMNS = ("row", "image_path", "path", "rating", "score", "modality", "expert_level", "prompt")

#: The most a ratings zip may unpack to: entries, and bytes uncompressed (a zip bomb is refused unread).
MAX_ARCHIVE_FILES = 20_000
MAX_ARCHIVE_BYTES = 4 * 1024**3


@dataclass(frozen=True)
class RatingsConfig:
    """How to read a ratings file; the defaults are MINIM's 1-3 scale with every image decoded.

    ``modalities``: None (default) takes any modality name, so a host's own domain (dermoscopy,
    fundus ...) loads and a new selector learns its modalities from the file; the built-in four are
    kept by their canonical names (``mr`` -> ``MRI``), others in lower case (``data.modalities``).
    A tuple accepts only those names (a selector's), and a row with another is a fault naming them.
    """

    rating_min: float = 1.0
    rating_max: float = 3.0
    check_images: bool = True  # decode every image (read_image) as part of validation
    modalities: tuple[str, ...] | None = None

    def __post_init__(self):
        if not self.rating_max > self.rating_min:
            raise ValueError(f"rating_max ({self.rating_max}) must be above rating_min ({self.rating_min})")

    def normalise(self, rating: float) -> float:
        """A rating on this scale as a score in [0, 1]: (r - min) / (max - min). The one place it is computed."""
        return (rating - self.rating_min) / (self.rating_max - self.rating_min)


class RatingsFileError(ValueError):
    """The file as a whole is unusable: missing, not CSV text, without rows, or lacking columns."""


@dataclass(frozen=True)
class RowError:
    """One fault in one row, numbered as the spreadsheet shows it so the expert can find it."""

    row: int  # header is row 1, the first data row is row 2
    field: str  # the column at fault, or "row" for a row with too many fields
    reason: str

    def __str__(self):
        return f"row {self.row}: {self.field}: {self.reason}"


@dataclass
class Ratings:
    """The usable rows (columns ``ROW_COLUMNS``) and every fault found in the others."""

    rows: pd.DataFrame
    errors: list[RowError]

    def report(self) -> str:
        """A summary for the expert: how many rows load, then each fault on its own line."""
        rejected = len({error.row for error in self.errors})
        if not rejected:
            return f"{len(self.rows)} rows usable, none rejected"
        lines = [f"{len(self.rows)} rows usable, {rejected} rejected:"]
        return "\n".join(lines + [f"  {error}" for error in self.errors])


def unpack_ratings_archive(archive: str | Path, folder: str | Path, max_files: int = MAX_ARCHIVE_FILES,
                           max_bytes: int = MAX_ARCHIVE_BYTES) -> Path:
    """Unpack a zip holding one ratings CSV and its images into ``folder``; returns the CSV's path.

    This is how a browser uploads a ratings file with its images. Before anything is written, the
    whole archive is refused when an entry would land outside ``folder`` (absolute paths, ``..``),
    or when it holds more than ``max_files`` entries or more than ``max_bytes`` uncompressed (the
    sizes its directory declares; zipfile never unpacks an entry past its declared size).
    """
    archive, folder = Path(archive), Path(folder).resolve()
    try:
        with zipfile.ZipFile(archive) as zipped:
            entries = zipped.infolist()
            if len(entries) > max_files:
                raise RatingsFileError(f"{archive.name}: {len(entries):,} entries; the limit is {max_files:,} files "
                                       "per ratings archive")
            unpacked = sum(entry.file_size for entry in entries)
            if unpacked > max_bytes:
                raise RatingsFileError(f"{archive.name}: unpacks to {unpacked:,} bytes; the limit is {max_bytes:,} "
                                       "bytes uncompressed per ratings archive")
            for entry in entries:
                if not (folder / entry.filename).resolve().is_relative_to(folder):
                    raise RatingsFileError(f"{archive.name}: entry {entry.filename!r} would unpack outside the archive's folder")
            zipped.extractall(folder)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:  # a damaged member fails in zlib, a cut one early
        raise RatingsFileError(f"{archive.name}: not a readable zip archive ({error})") from None
    csvs = sorted(p for p in folder.rglob("*.csv") if not p.name.startswith("."))
    if len(csvs) != 1:
        found = ", ".join(str(p.relative_to(folder)) for p in csvs) or "none"
        raise RatingsFileError(f"{archive.name}: expected exactly one .csv file in the archive, found {found}")
    return csvs[0]


def read_ratings(
    csv_path: str | Path, data_root: str | Path | None = None, config: RatingsConfig = RatingsConfig()
) -> Ratings:
    """Read and check a ratings file; image paths resolve against ``data_root`` (default: the CSV's folder).

    A row with several faults gets one ``RowError`` per fault; a row with none lands in ``rows``.
    Raises ``RatingsFileError`` only when the file as a whole is unusable.
    """
    csv_path = Path(csv_path)
    root = Path(csv_path.parent if data_root is None else data_root).resolve()
    header, records = _read_records(csv_path)
    checks = {
        "image_path": lambda text: _image_path(text, root, config.check_images),
        "rating": lambda text: _rating(text, config),
        "modality": lambda text: _modality(text, config.modalities),
        "expert_level": _expert_level,
        "prompt": _prompt,
    }
    good, errors = [], []
    for row, record in records:
        extra = record[len(header):]
        if any(cell.strip() for cell in extra):  # trailing empty cells, as spreadsheets export, are harmless
            errors.append(RowError(row, "row", f"{len(record)} fields, but the header has {len(header)}"))
            continue
        cells = dict(zip(header, record))
        values, faults = {}, []
        for name, check in checks.items():
            try:
                values[name] = check(cells.get(name, ""))  # a short row's missing cells read as empty
            except _Invalid as fault:
                faults.append(RowError(row, name, str(fault)))
        errors += faults
        if not faults:
            good.append({
                **values,
                "row": row,
                "image_path": cells["image_path"],  # as written; its check returned the resolved file
                "path": values["image_path"],
                "score": config.normalise(values["rating"]),
            })
    rows = pd.DataFrame(good, columns=list(ROW_COLUMNS))
    rows = rows.astype({"row": int, "rating": float, "score": float, "expert_level": int})
    return Ratings(rows, errors)


def write_ratings(rows: Iterable[dict] | pd.DataFrame, csv_path: str | Path) -> Path:
    """Write rows (dicts or a DataFrame holding ``COLUMNS``) as a ratings file; other columns are left out.

    ``image_path`` is written as given, so relative paths must make sense from the new file's folder
    (or from the ``data_root`` it will be read with).
    """
    frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
    missing = [name for name in COLUMNS if name not in frame.columns]
    if missing:
        raise ValueError(f"rows lack the column(s) {', '.join(missing)}")
    csv_path = Path(csv_path)
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    frame[list(COLUMNS)].to_csv(csv_path, index=False)
    return csv_path


def _read_records(csv_path: Path) -> tuple[list[str], list[tuple[int, list[str]]]]:
    """The header (names stripped, lower case) and the numbered data records, blank rows left out.

    Records are numbered before blank ones are dropped, and a quoted cell spanning lines stays one
    record, so the numbers are the spreadsheet's. ``utf-8-sig`` drops the byte-order mark Excel writes.
    """
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as handle:
            numbered = enumerate(csv.reader(handle), start=1)
            records = [(row, record) for row, record in numbered if any(cell.strip() for cell in record)]
    except FileNotFoundError as error:
        raise RatingsFileError(f"ratings file not found: {csv_path}") from error
    except (UnicodeDecodeError, csv.Error) as error:
        raise RatingsFileError(f"{csv_path} is not a UTF-8 CSV text file ({error})") from error
    if not records:
        raise RatingsFileError(f"{csv_path} is empty")
    header = [name.strip().lower() for name in records[0][1]]
    missing = [name for name in COLUMNS if name not in header]
    if missing:
        found = ", ".join(header)
        raise RatingsFileError(f"{csv_path} lacks the column(s) {', '.join(missing)}; it has: {found}")
    doubled = [name for name in COLUMNS if header.count(name) > 1]
    if doubled:
        raise RatingsFileError(f"{csv_path} has the column(s) {', '.join(doubled)} more than once")
    if len(records) == 1:
        raise RatingsFileError(f"{csv_path} has a header but no rows")
    return header, records[1:]


class _Invalid(Exception):
    """Raised by a cell check; its message is the reason shown to the expert."""


def _number(text: str) -> float:
    """The cell's value, or NaN. ``float`` alone would take "inf", "nan" and "2_5" (as 25)."""
    try:
        value = float(text)
    except ValueError:
        return math.nan
    return value if math.isfinite(value) and "_" not in text else math.nan


def _rating(text: str, config: RatingsConfig) -> float:
    value = _number(text)
    if math.isnan(value):
        raise _Invalid(f"{text!r} is not a number")
    if not config.rating_min <= value <= config.rating_max:
        raise _Invalid(f"{value:g} is not between {config.rating_min:g} and {config.rating_max:g}")
    return value


def _expert_level(text: str) -> int:
    value = _number(text)
    if value not in LEVELS:  # 2.0 is 2; 2.5 and NaN are neither
        raise _Invalid(f"{text!r} is not 1, 2 or 3")
    return int(value)


def _modality(text: str, known: tuple[str, ...] | None) -> str:
    problem = modality_name_problem(text)  # the one rule, shared with prompts and exports (data.modalities)
    if problem is not None:
        raise _Invalid(problem)
    modality = modality_name(text)
    if known is not None and modality not in known:
        raise _Invalid(f"{text.strip()!r} is not a modality the selector knows; use one of {', '.join(known)}")
    return modality


def _prompt(text: str) -> str:
    if not text.strip():
        raise _Invalid("empty")
    return text.strip()


def _image_path(text: str, root: Path, check_images: bool) -> Path:
    """The resolved file, which must lie inside ``root`` once ``..`` and symlinks are followed."""
    if not text.strip():
        raise _Invalid("empty")
    path = (root / text.strip()).resolve()  # an absolute path replaces root here
    if not path.is_relative_to(root):
        raise _Invalid(f"outside the data root {root}")
    if not path.is_file():
        raise _Invalid("file not found")
    if check_images:
        try:
            read_image(path)
        except ImageReadError as error:  # name the file as the CSV does, not by its long absolute path
            raise _Invalid(str(error).removeprefix(f"{path}: ").replace(str(path), text.strip())) from error
    return path

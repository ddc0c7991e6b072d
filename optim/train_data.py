"""What offline training reads: preference pairs from a Pick-a-Pic parquet file or a ratings CSV, and prompts.

A pair is ``(winner image, loser image, caption, weight)``; the weight is the expert level (1-3), a
loss weight as everywhere (``optim.preference.rewards``).

Pick-a-Pic's format, ours or anyone's: columns ``caption``, ``jpg_0``, ``jpg_1`` (encoded image bytes,
or the ``{bytes, path}`` structs that Hugging Face ``datasets.Image`` columns become in parquet) and
``label_0``, ``label_1`` (1/0, or 0.5/0.5 for a tie). Ties are DROPPED, as the paper's code does (the
diffusers example silently lets image 0 win them): a tie says neither image is better, so it gives no
pair. Images stay encoded, memory-mapped, until a batch needs them.

A ratings CSV (``image_path,rating,modality,expert_level,prompt``, ``data.ratings``) gives pairs within
each prompt: the image with the higher level-weighted mean rating wins.
"""

from __future__ import annotations

import io
import itertools
import math
import numbers
from pathlib import Path

from PIL import Image
from torch.utils.data import Dataset

from data.images import read_image, to_display, unit_to_pil
from data.ratings import read_ratings
from optim.preference.rewards import level_weight, level_weighted_mean

COLUMNS = ("caption", "jpg_0", "jpg_1", "label_0", "label_1")


def preference_pairs(path: str | Path) -> Dataset:
    """Pairs from a Pick-a-Pic parquet file or, for a ``.csv``, from a ratings CSV."""
    return RatingsPairs(path) if Path(path).suffix.lower() == ".csv" else PickAPicPairs(path)


def decode_image(cell) -> Image.Image:
    """One image cell: encoded bytes, or a ``datasets.Image`` struct ``{bytes, path}`` (bytes first)."""
    if isinstance(cell, dict):
        cell = cell.get("bytes") or Path(cell["path"]).read_bytes()
    return Image.open(io.BytesIO(cell))


class PickAPicPairs(Dataset):
    """``(winner image, loser image, caption, weight)`` for every decided row of a Pick-a-Pic parquet file.

    The weight is the row's ``expert_level`` where the file has one (the workbench's exports do), 1 otherwise:
    a level-3 expert's pair counts three times a level-1 expert's, as in the in-process updates.
    """

    def __init__(self, path: str | Path):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self.path = Path(path)
        try:
            names = pq.read_schema(path).names
        except (pa.ArrowException, OSError) as error:
            raise ValueError(f"{path} is not a readable parquet file ({error})") from None
        missing = [c for c in COLUMNS if c not in names]
        if missing:
            raise ValueError(f"{path} is not in Pick-a-Pic format: no column {', '.join(missing)} (needs {', '.join(COLUMNS)})")
        columns = list(COLUMNS) + (["expert_level"] if "expert_level" in names else [])
        self.table = pq.read_table(path, columns=columns, memory_map=True)
        self.levels = (self.table["expert_level"].to_pylist() if "expert_level" in columns
                       else [1] * self.table.num_rows)
        labels = list(zip(self.table["label_0"].to_pylist(), self.table["label_1"].to_pylist()))
        _refuse_rows(path, "label_0 and label_1 must be numbers (1 and 0, or 0.5 and 0.5 for a tie)",
                     [row for row, pair in enumerate(labels) if not all(_finite(label) for label in pair)])
        _refuse_rows(path, "expert_level must be a number from 1 to 3",
                     [row for row, level in enumerate(self.levels) if not _finite(level) or not 1 <= level <= 3])
        self.rows = [(row, 0 if l0 > l1 else 1) for row, (l0, l1) in enumerate(labels) if l0 != l1]  # (row, winner)
        self.ties = self.table.num_rows - len(self.rows)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Image.Image, Image.Image, str, float]:
        row, winner = self.rows[index]
        winner_image, loser_image = (self._image(row, side) for side in (winner, 1 - winner))
        return winner_image, loser_image, self.table["caption"][row].as_py(), float(self.levels[row])

    def _image(self, row: int, side: int) -> Image.Image:
        """One image cell, decoded when a batch needs it; a cell that is not an image names its row and column."""
        try:
            image = decode_image(self.table[f"jpg_{side}"][row].as_py())
            image.load()
        except (OSError, TypeError, ValueError, KeyError) as error:
            raise ValueError(f"{self.path} row {row} (counting from 0), jpg_{side}: not an image ({error})") from None
        return image


def _finite(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _refuse_rows(path, rule: str, rows: list[int]) -> None:
    """Raise naming the first rows (counting from 0) that break ``rule``, and how many there are."""
    if rows:
        shown = ", ".join(map(str, rows[:5])) + (f" and {len(rows) - 5} more" if len(rows) > 5 else "")
        raise ValueError(f"{path}: {'row' if len(rows) == 1 else 'rows'} {shown} (counting from 0): {rule}")


class RatingsPairs(Dataset):
    """``(winner image, loser image, prompt, weight)`` from an experts' ratings CSV (``data.ratings``).

    Within each prompt, every two images whose scores differ make a pair, the better one winning. An
    image's score is the level-weighted mean of its normalised ratings (the expert level weights,
    as everywhere). Equal scores are ties and are dropped, as Pick-a-Pic's are. Rows the CSV check
    refuses are reported (``report``) and left out; the good rows still train. A pair's weight is the
    mean of its two images' mean expert levels, as the reward model weighs imported ratings.
    """

    def __init__(self, path: str | Path):
        ratings = read_ratings(path)
        self.report = ratings.report()
        given: dict[tuple[str, Path], list[tuple[float, int]]] = {}  # (prompt, image): its (score, level) ratings
        for row in ratings.rows.itertuples():
            given.setdefault((row.prompt, row.path), []).append((row.score, row.expert_level))
        self.rows, self.ties = [], 0
        for prompt, keys in itertools.groupby(sorted(given), key=lambda key: key[0]):
            images = [(path, level_weighted_mean(given[prompt, path]),
                       sum(level_weight(level) for _, level in given[prompt, path]) / len(given[prompt, path]))
                      for _, path in keys]  # (image, score, mean level)
            for (first, a, level_a), (second, b, level_b) in itertools.combinations(images, 2):
                if a == b:
                    self.ties += 1
                    continue
                weight = (level_a + level_b) / 2
                self.rows.append((first, second, prompt, weight) if a > b else (second, first, prompt, weight))

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index: int) -> tuple[Image.Image, Image.Image, str, float]:
        winner, loser, prompt, weight = self.rows[index]
        return display_image(winner), display_image(loser), prompt, weight


def display_image(path: Path) -> Image.Image:
    """A PNG or DICOM file as the 8-bit grey image an expert saw (its window applied), for the VAE."""
    return unit_to_pil(to_display(read_image(path)))


def collate_pairs(batch: list[tuple]) -> tuple[list, list, list, list]:
    """Winners, losers, captions and weights as lists: the policy encodes PIL images itself."""
    return tuple(list(column) for column in zip(*batch))


def read_prompts(path: str | Path) -> list[str]:
    """GRPO's prompts: a text file, one prompt a line (blank lines skipped)."""
    prompts = [line.strip() for line in Path(path).read_text().splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts: write one prompt a line")
    return prompts
